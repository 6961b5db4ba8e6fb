echo building lib
mkdir -p out && cat src/*.c > out/liblib.a
