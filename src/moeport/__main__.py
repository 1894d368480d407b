from moeport.cli.app import main

main()
