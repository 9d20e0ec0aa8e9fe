#pragma once
// `moedist bench`: latency and bandwidth of dispatch_v2 + combine_v2 on local processes over shared
// memory, side by side with an MPI_Alltoallv pipeline and memcpy bandwidth, in one run.
int bench_main(int argc, char** argv, const char* self);
int bench_worker_main(int argc, char** argv);
