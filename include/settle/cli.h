/*
 * cli.h - the `settle` command line: subcommand dispatch for workers, producers and
 * operators (work, migrate, enqueue, dlq, stats, stock, pgsim, config, version, help).
 * Thread: the main thread; commands other than `work` and `pgsim` are short-lived and block.
 */
#ifndef SETTLE_CLI_H
#define SETTLE_CLI_H

/* Runs the command in argv and returns the process exit status: 0 success, 1 failure,
 * 2 usage or configuration error. */
int cli_main(int argc, char **argv);

#endif
