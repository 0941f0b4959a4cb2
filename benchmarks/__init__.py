"""Benchmarks: `bash benchmarks/run_cpu.sh` (CPU, issue 7); results under benchmarks/results/."""
