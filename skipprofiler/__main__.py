from skipprofiler._cli.main import main

main()
