#!/bin/sh
# Builds the images the Docker tests and the demo use, from scratch: no registry is needed.
#   rbb-test/busybox:1   a statically linked busybox with every applet on PATH
#   rbb-test/service:1   the same, answering HTTP on port 8080 (busybox httpd), as a service
# Images already present are kept. Needs `docker` and a static busybox (Debian:
# busybox-static); set BUSYBOX to its path if it is not /bin/busybox.
set -eu

BUSYBOX="${BUSYBOX:-/bin/busybox}"
BASE=rbb-test/busybox:1
SERVICE=rbb-test/service:1

have() { docker image inspect "$1" >/dev/null 2>&1; }

if have "$BASE" && have "$SERVICE"; then
    exit 0
fi
if ! [ -x "$BUSYBOX" ] || ! "$BUSYBOX" --list >/dev/null 2>&1; then
    echo "build-images: no busybox at $BUSYBOX (apt-get install busybox-static)" >&2
    exit 1
fi
if ldd "$BUSYBOX" >/dev/null 2>&1; then
    echo "build-images: $BUSYBOX is dynamically linked; a static one is needed (busybox-static)" >&2
    exit 1
fi

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/rootfs/bin" "$ctx/rootfs/tmp" "$ctx/rootfs/etc" "$ctx/rootfs/www"
cp "$BUSYBOX" "$ctx/rootfs/bin/busybox"
for applet in $("$BUSYBOX" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$ctx/rootfs/bin/$applet"
done
chmod 1777 "$ctx/rootfs/tmp"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$ctx/rootfs/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$ctx/rootfs/etc/group"
echo ok >"$ctx/rootfs/www/index.html"

cat >"$ctx/Dockerfile.base" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
ENV PATH=/bin
CMD ["sh"]
DOCKERFILE
cat >"$ctx/Dockerfile.service" <<DOCKERFILE
FROM $BASE
EXPOSE 8080
CMD ["httpd", "-f", "-p", "8080", "-h", "/www"]
DOCKERFILE

docker build -q -t "$BASE" -f "$ctx/Dockerfile.base" "$ctx" >/dev/null
docker build -q -t "$SERVICE" -f "$ctx/Dockerfile.service" "$ctx" >/dev/null
echo "build-images: built $BASE and $SERVICE"
