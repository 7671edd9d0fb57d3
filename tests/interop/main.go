// A sender of the interop matrix: Go's net/smtp, as a Go app sends mail.
// Usage: gosend ADDR FROM USER PASSWORD FILE RCPT... (USER "" for no AUTH); exit 1 with the error.
package main

import (
	"fmt"
	"net/smtp"
	"os"
)

func main() {
	addr, from, user, password, file := os.Args[1], os.Args[2], os.Args[3], os.Args[4], os.Args[5]
	rcpts := os.Args[6:]
	msg, err := os.ReadFile(file)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	var auth smtp.Auth
	if user != "" {
		auth = smtp.PlainAuth("", user, password, "127.0.0.1")
	}
	if err := smtp.SendMail(addr, auth, from, rcpts, msg); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
