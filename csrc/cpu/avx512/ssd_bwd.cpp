// The AVX-512 copy of the CPU SSD backward (see avx512/ssd_fwd.cpp).
#include "../ssd_bwd.cpp"
