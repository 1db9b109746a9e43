// Command pause is the local stack's pod sandbox ("pause") process: PID 1 of every pod's
// sandbox container. It holds the pod's namespaces open, reaps zombie children (processes
// re-parented to it when they share its PID namespace) and exits 0 on SIGINT or SIGTERM.
// Built static (CGO_ENABLED=0) into an image FROM scratch by modelapp_localstack/images.py.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

const version = "modelapp-pause 1"

func reap() {
	for {
		var status syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
		if pid <= 0 || err != nil {
			return
		}
	}
}

func main() {
	if len(os.Args) > 1 && (os.Args[1] == "-v" || os.Args[1] == "--version") {
		fmt.Println(version)
		return
	}
	if os.Getpid() != 1 {
		fmt.Fprintln(os.Stderr, "pause: warning: not running as PID 1")
	}
	signals := make(chan os.Signal, 16)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for received := range signals {
		if received == syscall.SIGCHLD {
			reap()
			continue
		}
		fmt.Fprintf(os.Stderr, "pause: shutting down, got %v\n", received)
		os.Exit(0)
	}
}
