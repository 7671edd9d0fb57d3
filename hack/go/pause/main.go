// Command pause holds a Pod's namespaces open for its containers: it sleeps until SIGINT or SIGTERM and,
// as PID 1 of a Pod that shares its process namespace, reaps the orphans it inherits. It does what
// Kubernetes' own pause (build/pause/linux/pause.c) does, in Go so that hack/control-plane can build it
// as a static binary with the toolchain it already needs.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "-v" {
		os.Stdout.WriteString("pause (outbound-relay)\n")
		return
	}
	signals := make(chan os.Signal, 4)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for sig := range signals {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var status syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
