// Emulation stand-in for <cuda_runtime.h>. What the project's kernels use from
// it is provided by cuda_emu.h. This folder is on the include path only
// when kernels are compiled for the CPU emulation.
#include "cuda_emu.h"
