/*
 * pgsim.h - the PG simulator (`settle pgsim`): the seed 001 payment gateway API served with
 * libmicrohttpd, with a configurable fault profile (seed 003) and admin endpoints for tests.
 * Thread: pgsim_main owns its process; MHD serves each connection on its own thread, so a
 * slow answer never blocks other requests. All shared state sits behind one mutex.
 */
#ifndef SETTLE_PGSIM_H
#define SETTLE_PGSIM_H

/* Runs the simulator until SIGINT/SIGTERM. argv[0] is "pgsim". Returns the exit status. */
int pgsim_main(int argc, char **argv);

#endif
