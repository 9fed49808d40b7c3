from ldmflow.cli import main

main()
