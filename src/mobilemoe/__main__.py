from mobilemoe.cli import main

main()
