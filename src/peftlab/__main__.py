from peftlab.cli import main

main()
