from probllm.cli import main

main()
