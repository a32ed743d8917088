/* The floor of any helper a daemon answers: read git's request, connect to
 * $FLOOR_SOCK, send one line, read one answer, write it after
 * "password=" in one write, exit. No checks, no parsing: what a helper
 * cannot do without. Built static, like credd.
 * scripts/bench-helper.sh times it beside `credd get`. */
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

int main(void) {
  char request[4096];
  if (read(0, request, sizeof request) < 0) return 1;
  const char *path = getenv("FLOOR_SOCK");
  if (!path) return 2;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_un addr = {0};
  addr.sun_family = AF_UNIX;
  strncpy(addr.sun_path, path, sizeof addr.sun_path - 1);
  if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr)) return 3;
  static const char line[] = "{\"v\":1,\"op\":\"get\"}\n";
  if (send(fd, line, sizeof line - 1, 0) < 0) return 4;
  char answer[2048] = "password=";
  ssize_t n = recv(fd, answer + 9, sizeof answer - 9, 0);
  if (n <= 0) return 5;
  if (write(1, answer, (size_t)n + 9) != n + 9) return 6;
  close(fd);
  return 0;
}
