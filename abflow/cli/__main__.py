from abflow.cli import main

main()
