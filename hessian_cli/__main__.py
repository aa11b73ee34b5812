from hessian_cli.cli import main

main()
