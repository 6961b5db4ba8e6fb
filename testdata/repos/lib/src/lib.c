int lib(void) { return 42; }
