"""Physics layer of the simulator: light profiles, PSF kernels and convolution, SIE + shear lensing, and
the arc renderer. Conventions: docs/physics.md."""
