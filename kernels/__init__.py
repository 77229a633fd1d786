"""Device and CPU kernels, written once for the CPU and CUDA targets of Numba."""
