from kaireon_pub.cli import main

main()
