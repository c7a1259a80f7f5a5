/*
 * main.c - the `settle` binary's entry point; everything happens in cli_main.
 */
#include "settle/cli.h"

int main(int argc, char **argv)
{
    return cli_main(argc, argv);
}
