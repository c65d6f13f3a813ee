"""`mobilemoe upcycle DENSE_CKPT OUT`: the MoE shape in fine-grained terms or in the scaling planner's."""

from __future__ import annotations

import argparse

from mobilemoe.argtypes import non_negative_float, non_negative_int, number, positive_int

FINE = ("experts", "expert_size", "top_k")
PLANNER = ("coarse_experts", "granularity")


def _upcycle(args: argparse.Namespace) -> None:
    from mobilemoe.checkpoint import load_config
    from mobilemoe.errors import MobileMoEError
    from mobilemoe.io import claim_dir
    from mobilemoe.upcycle.grow import MoEShape, print_report, upcycle

    fine = [getattr(args, n) is not None for n in (*FINE, "shared_size")]
    planner = [getattr(args, n) is not None for n in (*PLANNER, "coarse_top_k", "shared_slots", "coarse_size")]
    if any(fine) == any(planner):
        raise MobileMoEError("give the MoE shape one way: --experts/--expert-size/--top-k [--shared-size], or the "
                             "planner's --coarse-experts/--granularity [--coarse-top-k --shared-slots --coarse-size]")
    out = claim_dir(args.out, "checkpoint", args.force)  # before the (slow) calibration
    ffn_size = load_config(args.dense).ffn_size
    terms = None
    if any(fine):
        missing = [f"--{n.replace('_', '-')}" for n in FINE if getattr(args, n) is None]
        if missing:
            raise MobileMoEError(f"the fine-grained shape also needs {', '.join(missing)}")
        shape = MoEShape(args.experts, args.expert_size, args.top_k, args.shared_size or 0)
    else:
        missing = [f"--{n.replace('_', '-')}" for n in PLANNER if getattr(args, n) is None]
        if missing:
            raise MobileMoEError(f"the planner's shape also needs {', '.join(missing)}")
        terms = {"E": args.coarse_experts, "g": args.granularity, "k": args.coarse_top_k or 1,
                 "shared_slots": args.shared_slots or 0, "coarse_size": args.coarse_size or ffn_size}
        shape = MoEShape.from_planner(ffn_size, terms["E"], terms["g"], terms["k"], terms["shared_slots"],
                                      terms["coarse_size"])
    record = upcycle(args.dense, out, shape, args.method, noise=args.noise,
                     calibration_tokens=args.calibration_tokens, seed=args.seed, planner_terms=terms, force=args.force)
    print_report(record, out)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("upcycle", help="grow an MoE from a dense checkpoint: FFN neurons cut (split) or copied "
                                       "(copy) into a shared expert and routed experts, plus a calibrated router")
    p.add_argument("dense", metavar="DENSE_CKPT", help="dense checkpoint directory (with tokenizer.json)")
    p.add_argument("out", metavar="OUT", help="directory for the upcycled checkpoint")
    p.add_argument("--method", choices=["split", "copy"], default="split",
                   help="split: experts partition the parent's neurons (same total); copy: each slice copied "
                        "experts/slices times with noise (more total)")
    g = p.add_argument_group("shape, fine-grained")
    g.add_argument("--experts", type=positive_int, help="routed experts")
    g.add_argument("--expert-size", type=positive_int, help="neurons per routed expert (a multiple of 32)")
    g.add_argument("--top-k", type=positive_int, help="routed experts per token")
    g.add_argument("--shared-size", type=non_negative_int, help="neurons of the shared expert (default 0: none)")
    g = p.add_argument_group("shape, in the scaling planner's terms (`scaling plan` prints e.g. E4 k1 g8 +shared)")
    g.add_argument("--coarse-experts", type=positive_int, help="E: coarse experts, each as wide as the parent FFN")
    g.add_argument("--granularity", type=positive_int, help="g: fine experts per coarse expert")
    g.add_argument("--coarse-top-k", type=positive_int, help="k: coarse experts active per token (default 1)")
    g.add_argument("--shared-slots", type=non_negative_int,
                   help="fine slots of the k*g active ones that form the shared expert (+shared in a plan = k*g/2)")
    g.add_argument("--coarse-size", type=positive_int, help="width of a coarse expert (default: the parent's FFN)")
    p.add_argument("--noise", type=non_negative_float, default=0.01,
                   help="copy: std of the noise on each copy after the first, relative to the parent matrix's std")
    p.add_argument("--calibration-tokens", type=number(int, 64, what="at least 64"), default=4096,
                   help="tokens of embedded text that neuron activity and the router are fitted on")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--force", action="store_true", help="replace OUT even if it is not a checkpoint we wrote")
    p.set_defaults(handler=_upcycle)
