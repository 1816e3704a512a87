from cnnbal.cli import main

if __name__ == "__main__":  # worker processes are spawned: importing must not run the CLI
    main()
