from cnnbal.cli import main

main()
