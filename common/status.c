/* Status code strings, generated from the one table in mma.h. */
#include "mma.h"

const char *mma_strerror(int status)
{
    switch (status) {
#define MMA_STATUS_TEXT(name, value, text) \
    case value:                            \
        return text;
        MMA_STATUS_MAP(MMA_STATUS_TEXT)
#undef MMA_STATUS_TEXT
    }
    return "unknown mma status";
}

const char *mma_status_name(int status)
{
    switch (status) {
#define MMA_STATUS_NAME(name, value, text) \
    case value:                            \
        return "MMA_" #name;
        MMA_STATUS_MAP(MMA_STATUS_NAME)
#undef MMA_STATUS_NAME
    }
    return "MMA_UNKNOWN";
}
