"""Upcycling: grow a MobileMoE from a dense checkpoint (`mobilemoe upcycle`); the method is in grow.py."""
