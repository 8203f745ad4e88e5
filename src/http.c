/* http.c - see http.h */
