// The `moedist` command-line program: one binary, several subcommands.
//
// Subcommands are rows of kSubcommands below; to add one (bench, launch, ...), declare its entry
// point in tools/<name>.h, add tools/<name>.cc to the moedist_cli target and add a row. A row's `run`
// gets the arguments after the subcommand's name (argc/argv style, argv[argc] == nullptr) and the
// path this program was started as (for subcommands that start copies of it); an entry point with
// another signature is wrapped in a captureless lambda, e.g.
//   {"launch", "start N local ranks of a program", [](int argc, char** argv, const char*) { return launch_main(argc, argv); }},
// `help <name>` calls print_help, or without one runs the subcommand with "--help". Hidden rows
// (internal helpers such as a worker entry point) run but are not listed in the usage.
#include <algorithm>
#include <iostream>
#include <string>
#include <string_view>
#include <vector>

#include "bench.h"
#include "demo/demo.h"
#include "launch.h"
#include "moedist/version.h"

namespace {

struct Subcommand {
  const char* name;
  const char* summary;
  int (*run)(int argc, char** argv, const char* self);  // returns the process exit code
  void (*print_help)(std::ostream& os) = nullptr;
  bool hidden = false;
};

// The dispatch point of the subcommands.
const Subcommand kSubcommands[] = {
    {"demo", "run a whole MoE layer on ranks (local processes; --threads; mpirun: --transport mpi|hybrid) and check it",
     [](int argc, char** argv, const char*) { return moedist::tools::demo_main(std::vector<std::string>(argv, argv + argc)); },
     moedist::tools::print_demo_help},
    {"bench", "latency and bandwidth vs an MPI_Alltoallv pipeline and memcpy (local processes, mpirun)", bench_main},
    {"launch", "start N local ranks of a program (moedist groups over shared memory)",
     [](int argc, char** argv, const char*) { return launch_main(argc, argv); }},
    {"bench-worker", "one rank of `moedist bench` under mpirun", [](int argc, char** argv, const char*) { return bench_worker_main(argc, argv); },
     nullptr, true},
};

const Subcommand* find_subcommand(std::string_view name) {
  for (const Subcommand& s : kSubcommands)
    if (name == s.name) return &s;
  return nullptr;
}

void print_usage(std::ostream& os) {
  os << "usage: moedist <command> [options]\n"
        "       moedist help [<command>] | --help | --version\n"
        "\n"
        "commands:\n";
  for (const Subcommand& s : kSubcommands)
    if (!s.hidden) os << "  " << s.name << std::string(std::max<size_t>(10 - std::string_view(s.name).size(), 1), ' ') << s.summary << "\n";
  os << "  help      print this help, or a command's options (help <command>)\n"
        "\n"
        "Run 'moedist <command> --help' for the options of a command.\n";
}

int print_help_of(const Subcommand& s, const char* self) {
  if (s.print_help) {
    s.print_help(std::cout);
    return 0;
  }
  char help[] = "--help";
  char* argv[] = {help, nullptr};
  return s.run(1, argv, self);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    print_usage(std::cerr);
    return 2;
  }
  const char* self = argv[0];
  const std::string_view command = argv[1];
  if (command == "--version") {
    std::cout << "moedist " << MOEDIST_VERSION_STRING << "\n";
    return 0;
  }
  if (command == "--help" || command == "-h" || command == "help") {
    if (argc == 2 || std::string_view(argv[2]) == "--help" || std::string_view(argv[2]) == "-h") {
      print_usage(std::cout);
      return 0;
    }
    if (const Subcommand* s = find_subcommand(argv[2])) return print_help_of(*s, self);
    std::cerr << "moedist: no help for unknown command '" << argv[2] << "'\n\n";
    print_usage(std::cerr);
    return 2;
  }
  if (const Subcommand* s = find_subcommand(command)) return s->run(argc - 2, argv + 2, self);
  std::cerr << "moedist: unknown command '" << command << "'\n\n";
  print_usage(std::cerr);
  return 2;
}
