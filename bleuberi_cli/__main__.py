from bleuberi_cli.app import main

main()
