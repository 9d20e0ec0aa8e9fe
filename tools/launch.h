#pragma once
// `moedist launch -n N [--timeout SECONDS] [--] PROGRAM [ARGS...]`: starts N local ranks.
int launch_main(int argc, char** argv);
