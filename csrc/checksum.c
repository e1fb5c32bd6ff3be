/* Page checksums: CRC-32 exactly as zlib computes it (crc32(0, page, 4096): IEEE 802.3
 * polynomial, reflected, initial and final XOR 0xFFFFFFFF), which is what Python's zlib.crc32
 * returns and what the paging file stores per page (gfvm/pager/pagefile.py).
 *
 * Fast path (x86-64 with PCLMULQDQ, checked at run time): carry-less multiplication folding, as
 * described in Intel's paper "Fast CRC Computation for Generic Polynomials Using PCLMULQDQ". The
 * page is folded 64 bytes at a time into four 128-bit accumulators, those into one; the CRC of
 * those final 16 bytes (with zlib, ~20 ns) is the page's CRC, because folding keeps the value
 * congruent modulo the polynomial. Why it holds, in the bit-reflected order zlib uses (the first
 * bit of the data is the highest power): a 128-bit accumulator X = H*x^64 + L (H = its low 8
 * bytes in memory order) that lies D bits before a later 128-bit block contributes
 * X*x^D = H*x^(D+64) + L*x^D there. PCLMULQDQ of two reflected 64-bit operands yields the
 * product one power of x too low in a 128-bit reflected frame, so H is multiplied by
 * (x^(D+63) mod P) and L by (x^(D-1) mod P); each constant has degree < 32 and goes in as
 * bitreverse32(c) << 32, the products (degree < 95) fit in 128 bits. The constants are computed
 * from the polynomial at start-up. zlib does the rest (and everything without PCLMULQDQ).
 * With AVX-512 and VPCLMULQDQ the same folding runs on four lanes at once (crc32_page_vpclmul512).
 * Per page on this project's machines (AMD Zen 5): zlib ~0.7 us, PCLMULQDQ ~0.26 us, VPCLMULQDQ
 * ~0.08 us. From Python these run without the GIL (cffi). */
#include "kernel_abi.h"
#include "checksum.h"

#include <pthread.h>
#include <string.h>
#include <zlib.h>

#define PAGE 4096u
#define POLY 0x04C11DB7u /* x^32 + ... in normal (non-reflected) form, x^32 implied */

/* x^n mod P, normal form (bit d = coefficient of x^d). */
static uint32_t xpow_mod(unsigned n)
{
    uint32_t r = 1;
    for (unsigned i = 0; i < n; i++)
        r = (r << 1) ^ ((r & 0x80000000u) ? POLY : 0);
    return r;
}

static uint64_t folding_constant(unsigned n)
{
    uint32_t c = xpow_mod(n), rev = 0;
    for (int i = 0; i < 32; i++)
        rev |= ((c >> i) & 1u) << (31 - i);
    return (uint64_t)rev << 32;
}

#if defined(__x86_64__)
#include <immintrin.h>

/* Folding constants {for H, for L} at distances of 2048, 512 and 128 bits. */
static uint64_t k_fold16[2], k_fold4[2], k_fold1[2];
static int best = GFVM_CRC32_ZLIB;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void setup(void)
{
    k_fold16[0] = folding_constant(2048 + 63);
    k_fold16[1] = folding_constant(2048 - 1);
    k_fold4[0] = folding_constant(512 + 63);
    k_fold4[1] = folding_constant(512 - 1);
    k_fold1[0] = folding_constant(128 + 63);
    k_fold1[1] = folding_constant(128 - 1);
    __builtin_cpu_init();
    if (__builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse2"))
        best = GFVM_CRC32_PCLMUL;
    /* (libgcc checks that the kernel saves the AVX-512 registers, not only the CPU flag) */
    if (best == GFVM_CRC32_PCLMUL && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("vpclmulqdq"))
        best = GFVM_CRC32_VPCLMUL512;
}

__attribute__((target("pclmul,sse2"))) static inline __m128i fold(__m128i x, __m128i k, __m128i next)
{
    __m128i h = _mm_clmulepi64_si128(x, k, 0x00); /* H * constant for H */
    __m128i l = _mm_clmulepi64_si128(x, k, 0x11); /* L * constant for L */
    return _mm_xor_si128(_mm_xor_si128(h, l), next);
}

/* The CRC of a page from the 16 bytes that folding left (see the header). */
__attribute__((target("pclmul,sse2"))) static uint32_t crc_of_folded(__m128i x)
{
    unsigned char last[16];
    _mm_storeu_si128((__m128i *)last, x);
    /* zlib with crc 0xFFFFFFFF starts from 0 (the inversion is already in the data) and inverts
     * at the end, as crc32(0, page) does. */
    return (uint32_t)crc32(0xFFFFFFFFUL, last, 16);
}

__attribute__((target("pclmul,sse2"))) static uint32_t crc32_page_clmul(const void *page)
{
    const __m128i *p = page;
    const __m128i k4 = _mm_loadu_si128((const __m128i *)k_fold4);
    const __m128i k1 = _mm_loadu_si128((const __m128i *)k_fold1);
    /* zlib's initial value 0xFFFFFFFF = the first 32 bits of the data inverted */
    __m128i x0 = _mm_xor_si128(_mm_loadu_si128(p), _mm_cvtsi32_si128((int)0xFFFFFFFF));
    __m128i x1 = _mm_loadu_si128(p + 1), x2 = _mm_loadu_si128(p + 2), x3 = _mm_loadu_si128(p + 3);
    for (unsigned i = 4; i < PAGE / 16; i += 4) {
        x0 = fold(x0, k4, _mm_loadu_si128(p + i));
        x1 = fold(x1, k4, _mm_loadu_si128(p + i + 1));
        x2 = fold(x2, k4, _mm_loadu_si128(p + i + 2));
        x3 = fold(x3, k4, _mm_loadu_si128(p + i + 3));
    }
    return crc_of_folded(fold(fold(fold(x0, k1, x1), k1, x2), k1, x3));
}

/* The same folding, four 128-bit lanes per instruction (VPCLMULQDQ on 512-bit registers): four
 * accumulators of 64 bytes each take 256 bytes per step (distance 2048 bits), are folded into
 * one (distance 512), whose four lanes are folded into one (distance 128). The same constant
 * pair serves every lane since all lanes of a step lie the same distance before their next
 * block. On this project's machines about 3x faster than the 128-bit loop, which PCLMULQDQ's
 * throughput bounds there (~0.26 us per page). */
__attribute__((target("avx512f,vpclmulqdq,pclmul,sse2"))) static inline __m512i fold512(__m512i x, __m512i k,
                                                                                      __m512i next)
{
    __m512i h = _mm512_clmulepi64_epi128(x, k, 0x00);
    __m512i l = _mm512_clmulepi64_epi128(x, k, 0x11);
    return _mm512_ternarylogic_epi64(h, l, next, 0x96); /* h ^ l ^ next */
}

__attribute__((target("avx512f,vpclmulqdq,pclmul,sse2"))) static uint32_t crc32_page_vpclmul512(const void *page)
{
    const __m512i *p = page;
    const __m512i k16 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)k_fold16));
    const __m512i k4 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)k_fold4));
    const __m128i k1 = _mm_loadu_si128((const __m128i *)k_fold1);
    __m512i x0 = _mm512_xor_si512(_mm512_loadu_si512(p), _mm512_zextsi128_si512(_mm_cvtsi32_si128((int)0xFFFFFFFF)));
    __m512i x1 = _mm512_loadu_si512(p + 1), x2 = _mm512_loadu_si512(p + 2), x3 = _mm512_loadu_si512(p + 3);
    for (unsigned i = 4; i < PAGE / 64; i += 4) {
        x0 = fold512(x0, k16, _mm512_loadu_si512(p + i));
        x1 = fold512(x1, k16, _mm512_loadu_si512(p + i + 1));
        x2 = fold512(x2, k16, _mm512_loadu_si512(p + i + 2));
        x3 = fold512(x3, k16, _mm512_loadu_si512(p + i + 3));
    }
    __m512i x = fold512(fold512(fold512(x0, k4, x1), k4, x2), k4, x3);
    __m128i y = fold(_mm512_extracti32x4_epi32(x, 0), k1, _mm512_extracti32x4_epi32(x, 1));
    y = fold(y, k1, _mm512_extracti32x4_epi32(x, 2));
    return crc_of_folded(fold(y, k1, _mm512_extracti32x4_epi32(x, 3)));
}
#endif

int gfvm_crc32_best_impl(void)
{
#if defined(__x86_64__)
    pthread_once(&once, setup);
    return best;
#else
    return GFVM_CRC32_ZLIB;
#endif
}

int gfvm_crc32_page_using(const void *page, int impl, uint32_t *out)
{
    switch (impl) {
    case GFVM_CRC32_ZLIB:
        *out = (uint32_t)crc32(0L, (const Bytef *)page, PAGE);
        return 0;
#if defined(__x86_64__)
    case GFVM_CRC32_PCLMUL:
    case GFVM_CRC32_VPCLMUL512:
        if (impl > gfvm_crc32_best_impl())
            return -ENOTSUP;
        *out = impl == GFVM_CRC32_PCLMUL ? crc32_page_clmul(page) : crc32_page_vpclmul512(page);
        return 0;
#endif
    default:
        return -ENOTSUP;
    }
}

uint32_t gfvm_crc32_page(const void *page)
{
#if defined(__x86_64__)
    pthread_once(&once, setup);
    if (best == GFVM_CRC32_VPCLMUL512)
        return crc32_page_vpclmul512(page);
    if (best == GFVM_CRC32_PCLMUL)
        return crc32_page_clmul(page);
#endif
    return (uint32_t)crc32(0L, (const Bytef *)page, PAGE);
}

/* out[i] = CRC-32 of the i-th 4 KiB page of buf (n pages). */
int gfvm_crc32_pages(const void *buf, uint64_t n, uint32_t *out)
{
    const unsigned char *p = buf;
    for (uint64_t i = 0; i < n; i++)
        out[i] = gfvm_crc32_page(p + i * PAGE);
    return 0;
}

/* Whether one page matches `want`, a stored page sum as the File Manager keeps them
 * (gfvm/fm/store.py): 0 = a hole, whose bytes must all be zero; otherwise the page's CRC-32 with
 * 0 stored as 0xFFFFFFFF. `len` (<= PAGE) bytes are given; the page is those bytes zero-filled
 * to PAGE (the file's tail page). Returns 1 if it matches, 0 if not (and for len > PAGE: a
 * page is never longer). A boolean, not -errno: Python calls this directly, once per page read. */
int gfvm_page_matches(const void *buf, uint64_t len, uint32_t want)
{
    const unsigned char *p = buf;
    unsigned char padded[PAGE] __attribute__((aligned(64)));
    if (len > PAGE)
        return 0;
    if (want == 0) {
        /* a hole: every byte zero (the first 8, then the page against itself 8 bytes on) */
        static const unsigned char zero[8];
        size_t head = len < sizeof zero ? len : sizeof zero;
        return memcmp(p, zero, head) == 0 && (len <= head || memcmp(p, p + head, len - head) == 0);
    }
    if (len < PAGE) {
        memcpy(padded, p, len);
        memset(padded + len, 0, PAGE - len);
        p = padded;
    }
    uint32_t sum = gfvm_crc32_page(p);
    return (sum ? sum : 0xFFFFFFFFu) == want;
}
