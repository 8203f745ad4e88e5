/* ws.c - see ws.h */
