from streamledger.cli import main

main()
