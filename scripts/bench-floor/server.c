/* The floor of any daemon: a blocking accept loop on argv[1] that reads a
 * request and answers with one token-sized line in the socket protocol's
 * shape ({"v":1,"type":"token","token":"xxx…"}, 700 bytes).
 * scripts/bench-helper.sh starts it for the C client beside `credd get`. */
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

int main(int argc, char **argv) {
  if (argc != 2) return 2;
  int listener = socket(AF_UNIX, SOCK_STREAM, 0);
  struct sockaddr_un addr = {0};
  addr.sun_family = AF_UNIX;
  strncpy(addr.sun_path, argv[1], sizeof addr.sun_path - 1);
  if (listener < 0 || bind(listener, (struct sockaddr *)&addr, sizeof addr) ||
      listen(listener, 128))
    return 1;
  char answer[700];
  memset(answer, 'x', sizeof answer);
  static const char head[] = "{\"v\":1,\"type\":\"token\",\"token\":\"";
  memcpy(answer, head, sizeof head - 1);
  memcpy(answer + sizeof answer - 3, "\"}", 2);
  answer[sizeof answer - 1] = '\n';
  for (;;) {
    int fd = accept(listener, 0, 0);
    if (fd < 0) return 1;
    char request[512];
    if (recv(fd, request, sizeof request, 0) > 0) send(fd, answer, sizeof answer, MSG_NOSIGNAL);
    close(fd);
  }
}
