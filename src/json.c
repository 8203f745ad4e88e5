/* json.c - see json.h */
