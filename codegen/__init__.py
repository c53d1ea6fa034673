"""Code generation (templates, emitters, NVRTC, host and CUDA runtimes). Comes after the foundation."""
