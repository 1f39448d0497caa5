// recsys-edge: the gateway's public front. It refuses a gRPC request whose
// message is larger than EDGE_MAX_REQUEST_BYTES from its 5-byte length prefix,
// before the body arrives, and proxies every other call to the gateway.
//
// Why it exists: grpcio (the gateway's gRPC) reads a request body whole
// before it compares its length with the limit (grpc/grpc#43012), so 100
// oversized requests in flight cost the gateway a core's share of CPU and
// up to 1 GB of memory. Here each stream may send at most
// EDGE_STREAM_WINDOW_BYTES before the edge has read its prefix, and a
// refused stream is reset, so an abuser's bytes stop at the edge.
//
// Standard library only (Go 1.24+: unencrypted HTTP/2 and HTTP2Config), so it
// builds offline. Settings come from the environment (EDGE_*, fail fast); see
// docs/operations.md, "The edge".
package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

// gRPC status codes the edge answers with itself.
const (
	codeInvalidArgument   = 3
	codeResourceExhausted = 8
	codeUnimplemented     = 12
	codeUnavailable       = 14
)

const grpcPrefixBytes = 5

type config struct {
	address          string
	healthAddress    string
	upstream         string
	maxRequestBytes  int
	maxStreams       int
	streamWindow     int
	connectionWindow int
	tlsCert, tlsKey  string
	insecure         bool
	upstreamCA       string
	upstreamName     string
	upstreamCert     string
	upstreamKey      string
	drainDelay       time.Duration
	grace            time.Duration
	idleTimeout      time.Duration
}

type envReader struct{ errs []string }

func (e *envReader) str(name, fallback string) string {
	if v, ok := os.LookupEnv("EDGE_" + name); ok && strings.TrimSpace(v) != "" {
		return strings.TrimSpace(v)
	}
	return fallback
}

func (e *envReader) integer(name string, fallback, minimum, maximum int) int {
	raw := e.str(name, "")
	if raw == "" {
		return fallback
	}
	v, err := strconv.Atoi(raw)
	if err != nil || v < minimum || v > maximum {
		e.errs = append(e.errs, fmt.Sprintf("EDGE_%s=%q: an integer from %d to %d", name, raw, minimum, maximum))
		return fallback
	}
	return v
}

func (e *envReader) seconds(name string, fallback time.Duration, maximum float64) time.Duration {
	raw := e.str(name, "")
	if raw == "" {
		return fallback
	}
	v, err := strconv.ParseFloat(raw, 64)
	if err != nil || v < 0 || v > maximum {
		e.errs = append(e.errs, fmt.Sprintf("EDGE_%s=%q: seconds from 0 to %g", name, raw, maximum))
		return fallback
	}
	return time.Duration(v * float64(time.Second))
}

func (e *envReader) boolean(name string) bool {
	switch strings.ToLower(e.str(name, "false")) {
	case "1", "true", "yes", "on":
		return true
	case "0", "false", "no", "off":
		return false
	}
	e.errs = append(e.errs, fmt.Sprintf("EDGE_%s: true or false", name))
	return false
}

func configFromEnv() (config, error) {
	env := &envReader{}
	cfg := config{
		address: env.str("ADDRESS", "127.0.0.1:50051"),
		// Plaintext, grpc.health.v1 alone, answered by the gateway through
		// the edge: Kubernetes' gRPC probes speak no TLS. Empty: none.
		healthAddress: env.str("HEALTH_ADDRESS", ""),
		upstream:      env.str("UPSTREAM", "127.0.0.1:50050"),
		// The gateway's own limit (GATEWAY_MAX_REQUEST_BYTES): no larger body
		// would be taken there either.
		maxRequestBytes: env.integer("MAX_REQUEST_BYTES", 64<<10, 1, 64<<20),
		maxStreams:      env.integer("MAX_CONCURRENT_STREAMS", 128, 1, 10000),
		// gRPC's own default initial window: what a stream may send unread.
		streamWindow:     env.integer("STREAM_WINDOW_BYTES", 64<<10, 16<<10, 16<<20),
		connectionWindow: env.integer("CONNECTION_WINDOW_BYTES", 1<<20, 64<<10, 64<<20),
		tlsCert:          env.str("TLS_CERT", ""),
		tlsKey:           env.str("TLS_KEY", ""),
		insecure:         env.boolean("INSECURE"),
		upstreamCA:       env.str("UPSTREAM_CA", ""),
		upstreamName:     env.str("UPSTREAM_SERVER_NAME", "gateway"),
		upstreamCert:     env.str("UPSTREAM_CERT", ""),
		upstreamKey:      env.str("UPSTREAM_KEY", ""),
		drainDelay:       env.seconds("DRAIN_DELAY_SECONDS", time.Second, 60),
		grace:            env.seconds("GRACE_SECONDS", 10*time.Second, 600),
		idleTimeout:      env.seconds("IDLE_TIMEOUT_SECONDS", 5*time.Minute, 86400),
	}
	if cfg.insecure && (cfg.tlsCert != "" || cfg.tlsKey != "") {
		env.errs = append(env.errs, "EDGE_INSECURE=1 and EDGE_TLS_CERT/EDGE_TLS_KEY are both set: choose one")
	}
	if !cfg.insecure && (cfg.tlsCert == "" || cfg.tlsKey == "") {
		env.errs = append(env.errs, "no TLS certificate: set EDGE_TLS_CERT and EDGE_TLS_KEY, or EDGE_INSECURE=1 "+
			"(plaintext, local development)")
	}
	if (cfg.upstreamCert == "") != (cfg.upstreamKey == "") {
		env.errs = append(env.errs, "EDGE_UPSTREAM_CERT and EDGE_UPSTREAM_KEY go together")
	}
	if cfg.upstreamCert != "" && cfg.upstreamCA == "" {
		env.errs = append(env.errs, "EDGE_UPSTREAM_CERT needs EDGE_UPSTREAM_CA")
	}
	if len(env.errs) > 0 {
		return cfg, errors.New(strings.Join(env.errs, "; "))
	}
	return cfg, nil
}

// grpcError answers a call with a gRPC status and no message: a trailers-only
// reply (one HEADERS frame ending the stream).
func grpcError(w http.ResponseWriter, code int, message string) {
	h := w.Header()
	h.Set("Content-Type", "application/grpc")
	h.Set("Grpc-Status", strconv.Itoa(code))
	h.Set("Grpc-Message", percentEncode(message))
	w.WriteHeader(http.StatusOK)
}

// percentEncode follows gRPC's grpc-message encoding: bytes outside printable
// ASCII, and '%', as %XX.
func percentEncode(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < ' ' || c > '~' || c == '%' {
			fmt.Fprintf(&b, "%%%02X", c)
		} else {
			b.WriteByte(c)
		}
	}
	return b.String()
}

// messageLimit passes a request stream's messages on, failing a read that
// would start a message larger than the limit: later messages of a streaming
// call are held to the same limit as the first.
type messageLimit struct {
	body   io.ReadCloser
	limit  uint32
	header [grpcPrefixBytes]byte
	filled int    // bytes of the current message's prefix seen
	left   uint64 // bytes of the current message's payload still to pass
	passed int64  // bytes passed on in all
}

var errOversized = errors.New("a message of the request stream is over the edge's limit")

func (m *messageLimit) Read(p []byte) (int, error) {
	n, err := m.body.Read(p)
	m.passed += int64(n)
	for i := 0; i < n; {
		if m.left > 0 {
			step := uint64(n - i)
			if step > m.left {
				step = m.left
			}
			m.left -= step
			i += int(step)
			continue
		}
		m.header[m.filled] = p[i]
		m.filled++
		i++
		if m.filled == grpcPrefixBytes {
			m.filled = 0
			size := binary.BigEndian.Uint32(m.header[1:])
			if size > m.limit {
				return 0, errOversized
			}
			m.left = uint64(size)
		}
	}
	return n, err
}

func (m *messageLimit) Close() error { return m.body.Close() }

// trailersOnlyAsTrailers moves a trailers-only reply's status (gRPC's status
// in the one HEADERS frame that ends the stream) into trailers. Passed on as
// it came, the proxy's header flush can split it into HEADERS carrying the
// status and an empty DATA frame ending the stream, which gRPC clients
// reject as UNKNOWN ("Data frame with END_STREAM flag received").
func trailersOnlyAsTrailers(res *http.Response) error {
	if res.Header.Get("Grpc-Status") == "" {
		return nil
	}
	if res.Trailer == nil {
		res.Trailer = http.Header{}
	}
	for _, key := range []string{"Grpc-Status", "Grpc-Message", "Grpc-Status-Details-Bin"} {
		if values, ok := res.Header[key]; ok {
			res.Trailer[key] = values
			delete(res.Header, key)
		}
	}
	return nil
}

type edge struct {
	cfg      config
	proxy    *httputil.ReverseProxy
	refused  atomic.Int64
	inFlight atomic.Int64
	// At most one line a second while the gateway fails, with a count.
	lastLogged     atomic.Int64
	upstreamErrors atomic.Int64
}

func (e *edge) logUpstreamError(method string, err error) {
	count := e.upstreamErrors.Add(1)
	now := time.Now().UnixNano()
	last := e.lastLogged.Load()
	if now-last < int64(time.Second) || !e.lastLogged.CompareAndSwap(last, now) {
		return
	}
	log.Printf("upstream %s: %s: %v (%d calls failed upstream so far)", e.cfg.upstream, method, err, count)
}

func (e *edge) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.ProtoMajor != 2 || !strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc") {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.WriteHeader(http.StatusUnsupportedMediaType)
		io.WriteString(w, "recsys-edge: gRPC over HTTP/2 only\n")
		return
	}
	e.inFlight.Add(1)
	defer e.inFlight.Add(-1)

	// The first message's prefix decides before its body is read; a refused
	// stream's unread bytes are never taken (the server resets the stream).
	var prefix [grpcPrefixBytes]byte
	read, err := io.ReadFull(r.Body, prefix[:])
	switch {
	case err == io.EOF:
		// No message at all: the gateway gives the clear error.
		r.Body = http.NoBody
		e.proxy.ServeHTTP(w, r)
		return
	case err != nil:
		if r.Context().Err() != nil {
			return
		}
		grpcError(w, codeInvalidArgument, fmt.Sprintf("the request ends %d bytes into a gRPC message's 5-byte prefix", read))
		return
	}
	size := binary.BigEndian.Uint32(prefix[1:])
	if uint64(size) > uint64(e.cfg.maxRequestBytes) {
		e.refused.Add(1)
		grpcError(w, codeResourceExhausted, fmt.Sprintf(
			"the request is %d bytes; %s takes at most %d (EDGE_MAX_REQUEST_BYTES)", size, r.URL.Path, e.cfg.maxRequestBytes))
		return
	}
	first := make([]byte, grpcPrefixBytes+int(size))
	copy(first, prefix[:])
	if _, err := io.ReadFull(r.Body, first[grpcPrefixBytes:]); err != nil {
		if r.Context().Err() != nil {
			return
		}
		grpcError(w, codeInvalidArgument, fmt.Sprintf("the request ends before its %d-byte message does", size))
		return
	}
	rest := &messageLimit{body: r.Body, limit: uint32(e.cfg.maxRequestBytes)}
	r.Body = io.NopCloser(io.MultiReader(bytes.NewReader(first), rest))
	// The gateway closes its connections by age (GOAWAY); a call that raced
	// one is resent on a new connection, which needs the body again: the
	// first message, as long as nothing after it has been passed on (all
	// that a unary call has).
	r.GetBody = func() (io.ReadCloser, error) {
		if rest.passed > 0 {
			return nil, errors.New("a streaming call's later messages were already sent")
		}
		return io.NopCloser(io.MultiReader(bytes.NewReader(first), rest)), nil
	}
	r.ContentLength = -1
	e.proxy.ServeHTTP(w, r)
}

func tlsFiles(certFile, keyFile string) (tls.Certificate, error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return cert, fmt.Errorf("reading %s and %s: %w", certFile, keyFile, err)
	}
	return cert, nil
}

func upstreamTransport(cfg config) (*http.Transport, string, error) {
	transport := &http.Transport{
		Protocols:           new(http.Protocols),
		MaxIdleConnsPerHost: 16,
		IdleConnTimeout:     90 * time.Second,
		// Many idle health streams: further connections once one is at the
		// gateway's streams-per-connection limit.
		HTTP2: &http.HTTP2Config{
			MaxReceiveBufferPerStream:     4 << 20,
			MaxReceiveBufferPerConnection: 16 << 20,
			SendPingTimeout:               30 * time.Second,
			PingTimeout:                   10 * time.Second,
		},
		DialContext: (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
	}
	if cfg.upstreamCA == "" {
		// The gateway on loopback in the same pod: h2c with prior knowledge,
		// as gRPC speaks it.
		transport.Protocols.SetUnencryptedHTTP2(true)
		return transport, "http", nil
	}
	pem, err := os.ReadFile(cfg.upstreamCA)
	if err != nil {
		return nil, "", fmt.Errorf("EDGE_UPSTREAM_CA: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, "", fmt.Errorf("EDGE_UPSTREAM_CA %s: no PEM certificate in it", cfg.upstreamCA)
	}
	tlsConfig := &tls.Config{RootCAs: roots, ServerName: cfg.upstreamName, MinVersion: tls.VersionTLS12}
	if cfg.upstreamCert != "" {
		cert, err := tlsFiles(cfg.upstreamCert, cfg.upstreamKey)
		if err != nil {
			return nil, "", err
		}
		tlsConfig.Certificates = []tls.Certificate{cert}
	}
	transport.TLSClientConfig = tlsConfig
	transport.Protocols.SetHTTP2(true)
	return transport, "https", nil
}

// callerGoneFilter drops the proxy's line for a caller that went away mid-call
// (a cancel or a passed deadline): any caller could flood the log with them.
type callerGoneFilter struct{ out io.Writer }

func (f callerGoneFilter) Write(p []byte) (int, error) {
	if bytes.Contains(p, []byte("client disconnected")) || bytes.Contains(p, []byte("context canceled")) {
		return len(p), nil
	}
	return f.out.Write(p)
}

func newEdge(cfg config) (*edge, error) {
	transport, scheme, err := upstreamTransport(cfg)
	if err != nil {
		return nil, err
	}
	target := &url.URL{Scheme: scheme, Host: cfg.upstream}
	e := &edge{cfg: cfg}
	e.proxy = &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			pr.SetXForwarded()
		},
		Transport: transport,
		// Replies stream (server-streaming calls, health Watch): no buffering.
		FlushInterval:  -1,
		ModifyResponse: trailersOnlyAsTrailers,
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			if errors.Is(err, errOversized) {
				e.refused.Add(1)
				grpcError(w, codeResourceExhausted, fmt.Sprintf(
					"a message of the request stream is over %d bytes (EDGE_MAX_REQUEST_BYTES)", cfg.maxRequestBytes))
				return
			}
			if r.Context().Err() != nil {
				return // the caller went away or its deadline passed
			}
			e.logUpstreamError(r.URL.Path, err)
			grpcError(w, codeUnavailable, "the gateway behind the edge did not answer")
		},
		ErrorLog: log.New(callerGoneFilter{os.Stderr}, "recsys-edge proxy: ", log.LstdFlags),
	}
	return e, nil
}

// healthOnly passes grpc.health.v1 calls on and refuses every other method.
func healthOnly(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !strings.HasPrefix(r.URL.Path, "/grpc.health.v1.Health/") {
			grpcError(w, codeUnimplemented, "the health port serves grpc.health.v1 only")
			return
		}
		next.ServeHTTP(w, r)
	})
}

func newHealthServer(address string, handler http.Handler) *http.Server {
	server := &http.Server{Addr: address, Handler: healthOnly(handler), Protocols: new(http.Protocols),
		ReadHeaderTimeout: 5 * time.Second, IdleTimeout: time.Minute,
		HTTP2:    &http.HTTP2Config{MaxConcurrentStreams: 16, MaxReceiveBufferPerStream: 16 << 10},
		ErrorLog: log.New(os.Stderr, "recsys-edge health: ", log.LstdFlags)}
	server.Protocols.SetUnencryptedHTTP2(true)
	return server
}

func newServer(cfg config, handler http.Handler) (*http.Server, error) {
	server := &http.Server{
		Handler:           handler,
		Protocols:         new(http.Protocols),
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       cfg.idleTimeout,
		MaxHeaderBytes:    64 << 10,
		HTTP2: &http.HTTP2Config{
			MaxConcurrentStreams:          cfg.maxStreams,
			MaxReceiveBufferPerStream:     cfg.streamWindow,
			MaxReceiveBufferPerConnection: cfg.connectionWindow,
			MaxDecoderHeaderTableSize:     4096,
			MaxReadFrameSize:              16 << 10,
		},
		ErrorLog: log.New(os.Stderr, "recsys-edge: ", log.LstdFlags),
	}
	// HTTP/1 is kept only to answer it with a clear 415.
	server.Protocols.SetHTTP1(true)
	if cfg.insecure {
		server.Protocols.SetUnencryptedHTTP2(true)
		return server, nil
	}
	cert, err := tlsFiles(cfg.tlsCert, cfg.tlsKey)
	if err != nil {
		return nil, err
	}
	server.Protocols.SetHTTP2(true)
	server.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12,
		NextProtos: []string{"h2", "http/1.1"}}
	return server, nil
}

func main() {
	log.SetPrefix("recsys-edge: ")
	cfg, err := configFromEnv()
	if err != nil {
		log.Fatalf("configuration: %v", err)
	}
	e, err := newEdge(cfg)
	if err != nil {
		log.Fatalf("upstream: %v", err)
	}
	server, err := newServer(cfg, e)
	if err != nil {
		log.Fatalf("server: %v", err)
	}
	listener, err := net.Listen("tcp", cfg.address)
	if err != nil {
		log.Fatalf("listen on %s: %v", cfg.address, err)
	}
	mode := "TLS"
	if cfg.insecure {
		mode = "PLAINTEXT (development)"
	}
	// One line a launcher can wait for, with the port actually bound.
	fmt.Printf("recsys-edge listening on %s (%s), upstream %s, requests at most %d bytes\n",
		listener.Addr(), mode, cfg.upstream, cfg.maxRequestBytes)
	os.Stdout.Sync()

	serveErr := make(chan error, 2)
	var health *http.Server
	if cfg.healthAddress != "" {
		health = newHealthServer(cfg.healthAddress, e)
		healthListener, err := net.Listen("tcp", cfg.healthAddress)
		if err != nil {
			log.Fatalf("listen on %s (EDGE_HEALTH_ADDRESS): %v", cfg.healthAddress, err)
		}
		go func() { serveErr <- health.Serve(healthListener) }()
	}
	go func() {
		if cfg.insecure {
			serveErr <- server.Serve(listener)
		} else {
			serveErr <- server.ServeTLS(listener, "", "")
		}
	}()
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	select {
	case err := <-serveErr:
		log.Fatalf("serving: %v", err)
	case sig := <-signals:
		// Callers learn of the stop by GOAWAY; in-flight calls finish.
		log.Printf("%v: draining (%d calls in flight, %d oversized refused so far)", sig, e.inFlight.Load(), e.refused.Load())
		time.Sleep(cfg.drainDelay)
		ctx, cancel := context.WithTimeout(context.Background(), cfg.grace)
		defer cancel()
		if health != nil {
			health.Close()
		}
		if err := server.Shutdown(ctx); err != nil {
			log.Printf("drain cut short after %v: %v", cfg.grace, err)
			server.Close()
		}
		log.Printf("stopped")
	}
}
