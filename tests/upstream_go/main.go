// A stand-in for the Get2Dial control plane's router, for the gateway's agreement tests: Go's
// net/http ServeMux, which routes on the percent-decoded path (r.URL.Path), with the control
// plane's patterns. Every handler answers with what it saw, so a test can tell which handler
// a request reached and with which headers.
//
// Usage: upstream_go  (prints "listening 127.0.0.1:PORT" once it accepts connections)
package main

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
)

type seen struct {
	Handler string              `json:"handler"`
	Method  string              `json:"method"`
	Path    string              `json:"path"`
	Target  string              `json:"target"`
	Query   map[string][]string `json:"query"`
	Headers map[string][]string `json:"headers"`
	Host    string              `json:"host"`
}

var (
	mu     sync.Mutex
	counts = map[string]int{}
)

func count(key string) {
	mu.Lock()
	counts[key]++
	mu.Unlock()
}

func echo(name string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		count("handler:" + name)
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(seen{
			Handler: name,
			Method:  r.Method,
			Path:    r.URL.Path,
			Target:  r.RequestURI,
			Query:   r.URL.Query(),
			Headers: r.Header,
			Host:    r.Host,
		})
	}
}

// login answers like the control plane: 401 for a wrong password, 200 for "right".
func login(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		count("handler:login:" + r.Method)
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	var body struct {
		Email        string `json:"email"`
		Password     string `json:"password"`
		TenantDomain string `json:"tenant_domain"`
	}
	if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
		http.Error(w, `{"status":"error","message":"invalid request body"}`, http.StatusBadRequest)
		return
	}
	email := strings.ToLower(strings.TrimSpace(body.Email))
	domain := strings.ToLower(strings.TrimSpace(body.TenantDomain))
	count("handler:login")
	count("guess:" + domain + "/" + email)
	count("guess:*/" + email)
	w.Header().Set("Content-Type", "application/json")
	if body.Password == "right" {
		fmt.Fprint(w, `{"status":"success","data":{"token":"t"}}`)
		return
	}
	w.WriteHeader(http.StatusUnauthorized)
	fmt.Fprint(w, `{"status":"error","message":"invalid credentials"}`)
}

func main() {
	mux := http.NewServeMux()
	mux.HandleFunc("/api/v1/auth/login", login)
	mux.HandleFunc("/api/v1/nodes/register", echo("node-register"))
	mux.HandleFunc("/api/v1/nodes/heartbeat", echo("node-heartbeat"))
	mux.HandleFunc("/api/v1/nodes/", echo("nodes"))
	mux.HandleFunc("/api/v1/edge/desired-state", echo("desired-state"))
	mux.HandleFunc("/api/v1/", echo("api"))
	mux.HandleFunc("/ws/", echo("ws"))
	mux.HandleFunc("/public/", echo("public"))

	// Counters for the tests, on a port of their own (never behind the gateway).
	stats := http.NewServeMux()
	stats.HandleFunc("/counts", func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		json.NewEncoder(w).Encode(counts)
	})

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	sl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	go http.Serve(sl, stats)
	fmt.Printf("listening %s %s\n", ln.Addr(), sl.Addr())
	http.Serve(ln, mux)
}
