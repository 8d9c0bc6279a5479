/* vsock_test: the guest kit's vsock test program (vdm-vsock's real-guest tests).
 *
 *   vsock_test connect CID PORT BYTES SEED   connect to CID:PORT
 *   vsock_test listen PORT BYTES SEED        accept one connection on PORT (any CID)
 *
 * Either way, on the connection: send BYTES bytes of a xorshift64 stream seeded with SEED,
 * shut down the sending side, then read until the peer's end; print one line
 *   tx=N tx_fnv=HEX rx=M rx_fnv=HEX
 * (FNV-1a 64 of what was sent and of what was received). Exit 0, or 1 with a line on stderr.
 * Built static by the host's gcc (tests/vsock/guestprog.py); no library but libc.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static uint64_t fnv_step(uint64_t h, const unsigned char *p, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		h ^= p[i];
		h *= 0x100000001b3ULL;
	}
	return h;
}

static int die(const char *what)
{
	fprintf(stderr, "vsock_test: %s: %s\n", what, strerror(errno));
	return 1;
}

static int talk(int fd, unsigned long long bytes, uint64_t seed)
{
	static unsigned char buf[65536];
	uint64_t x = seed ? seed : 1, txh = 0xcbf29ce484222325ULL, rxh = txh;
	unsigned long long sent = 0, got = 0;

	while (sent < bytes) {
		size_t n = bytes - sent < sizeof(buf) ? (size_t)(bytes - sent) : sizeof(buf);
		for (size_t i = 0; i < n; i++) {
			x ^= x << 13; x ^= x >> 7; x ^= x << 17;
			buf[i] = (unsigned char)x;
		}
		txh = fnv_step(txh, buf, n);
		for (size_t off = 0; off < n;) {
			ssize_t w = write(fd, buf + off, n - off);
			if (w < 0 && errno == EINTR)
				continue;
			if (w <= 0)
				return die("write");
			off += (size_t)w;
		}
		sent += n;
	}
	if (shutdown(fd, SHUT_WR) < 0)
		return die("shutdown");
	for (;;) {
		ssize_t r = read(fd, buf, sizeof(buf));
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			return die("read");
		if (r == 0)
			break;
		rxh = fnv_step(rxh, buf, (size_t)r);
		got += (unsigned long long)r;
	}
	printf("tx=%llu tx_fnv=%016llx rx=%llu rx_fnv=%016llx\n", sent, (unsigned long long)txh, got,
	       (unsigned long long)rxh);
	return 0;
}

int main(int argc, char **argv)
{
	struct sockaddr_vm a;
	int fd, rc;

	memset(&a, 0, sizeof(a));
	a.svm_family = AF_VSOCK;
	fd = socket(AF_VSOCK, SOCK_STREAM, 0);
	if (fd < 0)
		return die("socket(AF_VSOCK)");
	if (argc == 6 && !strcmp(argv[1], "connect")) {
		a.svm_cid = (unsigned)strtoul(argv[2], NULL, 0);
		a.svm_port = (unsigned)strtoul(argv[3], NULL, 0);
		if (connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0)
			return die("connect");
		rc = talk(fd, strtoull(argv[4], NULL, 0), strtoull(argv[5], NULL, 0));
	} else if (argc == 5 && !strcmp(argv[1], "listen")) {
		int c;
		a.svm_cid = VMADDR_CID_ANY;
		a.svm_port = (unsigned)strtoul(argv[2], NULL, 0);
		if (bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(fd, 1) < 0)
			return die("bind/listen");
		printf("listening\n");
		fflush(stdout);
		c = accept(fd, NULL, NULL);
		if (c < 0)
			return die("accept");
		rc = talk(c, strtoull(argv[3], NULL, 0), strtoull(argv[4], NULL, 0));
		close(c);
	} else {
		fprintf(stderr, "usage: vsock_test connect CID PORT BYTES SEED | listen PORT BYTES SEED\n");
		return 2;
	}
	close(fd);
	return rc;
}
