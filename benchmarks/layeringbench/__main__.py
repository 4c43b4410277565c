from benchmarks.layeringbench.run import main

main()
