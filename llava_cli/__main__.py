from llava_cli.cli.app import main

main()
