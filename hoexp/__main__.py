from hoexp.cli import main

main()
