/* Memory/compute overlap probe for the decode kernels' access pattern (docs/kernels.md, "Where the last
 * 10-20% go"). Not part of the package: a standalone harness, one thread.
 *
 *   gcc -O2 -mavx512f -mavx512bw -mavx512vbmi -o /tmp/stream_overlap benchmarks/stream_overlap.c
 *   /tmp/stream_overlap N RB k REPS PAD WORK      e.g.  /tmp/stream_overlap 65536 512 8 2 0 4
 *
 * k plane arrays of N rows x RB bytes (plane stride N*RB + PAD) plus a scale array of RB/2 bytes per row,
 * read row by row as a decode pass reads them (the k plane rows of a row, then its scales), against one
 * contiguous buffer of the same size ("one"). WORK = dependent vpermb+xor pairs per loaded 64-byte vector:
 * synthetic compute, so that the compute-only rate ("cache-resident", 256 rows read 200 times) can be set
 * near the kernel's and the drop of the streamed rate below min(memory, compute) observed. "+pf" adds
 * prefetcht0 of the rows two ahead, as bd_prefetch_rows does.
 */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
/* one contiguous stream */
static __m512i sum1(const uint8_t *b, size_t n){
  __m512i a0=_mm512_setzero_si512(),a1=a0,a2=a0,a3=a0;
  for(size_t i=0;i<n;i+=256){
    a0=_mm512_add_epi32(a0,_mm512_load_si512(b+i));a1=_mm512_add_epi32(a1,_mm512_load_si512(b+i+64));
    a2=_mm512_add_epi32(a2,_mm512_load_si512(b+i+128));a3=_mm512_add_epi32(a3,_mm512_load_si512(b+i+192));}
  return _mm512_add_epi32(_mm512_add_epi32(a0,a1),_mm512_add_epi32(a2,a3));
}
/* k plane streams, row by row, RB bytes per plane row, plus a scale stream of sb bytes per row */
static int WORK=0;
static __m512i work(__m512i v){ __m512i idx=_mm512_set1_epi8(3); for(int i=0;i<WORK;i++) v=_mm512_permutexvar_epi8(idx,_mm512_xor_si512(v,idx)); return v;}
static __m512i sumk(const uint8_t *b, size_t N, size_t RB, int k, size_t ps, const uint8_t *sc, size_t sb, int pf){
  __m512i a0=_mm512_setzero_si512(),a1=a0,a2=a0,a3=a0;
  for(size_t n=0;n<N;n++){
    if(pf){ for(int p=0;p<k;p++) for(size_t o=0;o<RB;o+=64) _mm_prefetch((const char*)b+p*ps+(n+2)*RB+o,_MM_HINT_T0);}
    for(size_t o=0;o<RB;o+=64){
      for(int p=0;p<k;p+=2){
        a0=_mm512_add_epi32(a0,work(_mm512_load_si512(b+p*ps+n*RB+o)));
        if(p+1<k)a1=_mm512_add_epi32(a1,work(_mm512_load_si512(b+(p+1)*ps+n*RB+o)));}
    }
    for(size_t o=0;o<sb;o+=64) a2=_mm512_add_epi32(a2,_mm512_load_si512(sc+n*sb+o));
  }
  return _mm512_add_epi32(_mm512_add_epi32(a0,a1),_mm512_add_epi32(a2,a3));
}
int main(int argc,char**argv){
  WORK=atoi(argv[6]); size_t N=atol(argv[1]), RB=atol(argv[2]); int k=atoi(argv[3]); int reps=atoi(argv[4]); size_t pad=atol(argv[5]);
  size_t ps=N*RB+pad, sb=RB/8*4/8*8; if(sb<64) sb=64; /* ~4 bytes of scales per 64 cols: RB*8/64*4 = RB/2 */
  sb = RB/2; if (sb < 64) sb = 64;
  uint8_t *b=aligned_alloc(2<<20, (ps*k+(2<<20))&~((size_t)(2<<20)-1));
  uint8_t *sc=aligned_alloc(2<<20, ((N*sb)+(2<<20))&~((size_t)(2<<20)-1));
  memset(b,1,ps*k); memset(sc,1,N*sb);
  size_t tot=(size_t)k*N*RB+N*sb;
  uint8_t *one=aligned_alloc(2<<20, (tot+(2<<20))&~((size_t)(2<<20)-1)); memset(one,1,tot);
  volatile int sink=0;
  { size_t Ns=256; double t0=now(); __m512i s=_mm512_setzero_si512(); for(int r=0;r<200;r++) s=_mm512_add_epi32(s,sumk(b,Ns,RB,k,ps,sc,sb,0)); double t1=now();
    sink+=_mm512_reduce_add_epi32(s); size_t tb=200*((size_t)k*Ns*RB+Ns*sb); printf("cache-resident: %.1f GB/s equivalent\n", tb/(t1-t0)/1e9); }
  for(int r=0;r<reps;r++){
    double t0=now(); __m512i s=sum1(one,tot&~(size_t)255); double t1=now();
    __m512i s2=sumk(b,N,RB,k,ps,sc,sb,0); double t2=now();
    __m512i s3=sumk(b,N,RB,k,ps,sc,sb,1); double t3=now();
    sink+=_mm512_reduce_add_epi32(s)+_mm512_reduce_add_epi32(s2)+_mm512_reduce_add_epi32(s3);
    printf("one %.1f GB/s  k-streams %.1f GB/s  k-streams+pf %.1f GB/s\n",tot/(t1-t0)/1e9,tot/(t2-t1)/1e9,tot/(t3-t2)/1e9);
  }
  return 0;
}
