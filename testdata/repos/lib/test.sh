echo testing lib
test -s out/liblib.a
