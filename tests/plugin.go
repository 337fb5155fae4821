// A stand-in for the platform's memory plugin in Go, faithful to contract §4: net/http (keep-alive,
// pipelined requests answered in order, one at a time per connection), a PostgreSQL pool of at most 25
// connections through lib/pq, one statement (one transaction) per write, upsert by id keeping the first
// created_at, the stored content_tsv column with its GIN index and an index on namespace, no auto-created
// namespaces (a write to one that was never PUT is a 500), a search capped at 100, {"memories": null} for
// nothing found, /v1/health 503 "degraded" while its database is down.
//
// Used by the tests and `make bench`; the Python stand-in (plugin_server.py) stays for fault injection.
// Load shapes for the bench: -wait D holds each write's database connection D before it commits (a slow
// disk), -capacity K works on at most K requests at once, the others queued in arrival order, and -sleep
// D spends D on every request worked on (with -capacity: a plugin at its capacity).
//
//	go build -o memory-plugin plugin.go   (GO111MODULE=off, GOPATH holding github.com/lib/pq)
//	memory-plugin -dsn 'host=... dbname=...' [-listen 127.0.0.1:0] [-wait 20ms] [-capacity 4 -sleep 5ms]
//
// It prints "listening on HOST:PORT" once it serves.
package main

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"time"

	"github.com/lib/pq"
)

const schema = `
CREATE TABLE IF NOT EXISTS namespaces (
    name text PRIMARY KEY, kind text NOT NULL, expires_at timestamptz, metadata jsonb,
    updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS memories (
    id uuid PRIMARY KEY, namespace text NOT NULL REFERENCES namespaces(name) ON DELETE CASCADE,
    content text NOT NULL, kind text NOT NULL, source text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(), expires_at timestamptz,
    propagation jsonb, pin boolean NOT NULL DEFAULT false, embedding jsonb,
    content_tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', content)) STORED);
CREATE INDEX IF NOT EXISTS memories_content_tsv ON memories USING gin (content_tsv);
CREATE INDEX IF NOT EXISTS memories_namespace ON memories (namespace);`

const searchCap = 100

var (
	namespaceName  = regexp.MustCompile(`^[a-z]+:[A-Za-z0-9_:.\-]+$`)
	namespaceKinds = map[string]bool{"workspace": true, "team": true, "org": true, "custom": true}
	memoryKinds    = map[string]bool{"fact": true, "summary": true, "checkpoint": true}
	sources        = map[string]bool{"agent": true, "runtime": true, "user": true}
)

type plugin struct {
	db       *sql.DB
	wait     time.Duration // each write holds its database connection this long before it commits
	sleep    time.Duration // each request worked on takes at least this long
	capacity chan struct{} // nil: no limit; else at most cap() requests worked on at once
}

type apiError struct {
	status int
	code   string
	msg    string
}

func (e *apiError) Error() string { return e.msg }

func badRequest(format string, args ...interface{}) error {
	return &apiError{http.StatusBadRequest, "bad_request", fmt.Sprintf(format, args...)}
}

func notFound(msg string) error { return &apiError{http.StatusNotFound, "not_found", msg} }

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to serve on")
	dsn := flag.String("dsn", "", "the plugin's PostgreSQL (lib/pq connection string)")
	pool := flag.Int("pool", 25, "database connections at most")
	wait := flag.Duration("wait", 0, "each write holds its database connection this long before it commits")
	sleep := flag.Duration("sleep", 0, "each request worked on takes at least this long")
	capacity := flag.Int("capacity", 0, "requests worked on at once at most (0: no limit)")
	flag.Parse()

	db, err := sql.Open("postgres", *dsn)
	if err != nil {
		log.Fatal(err)
	}
	db.SetMaxOpenConns(*pool)
	db.SetMaxIdleConns(*pool)
	if _, err := db.Exec(schema); err != nil {
		log.Fatal(err)
	}
	p := &plugin{db: db, wait: *wait, sleep: *sleep}
	if *capacity > 0 {
		p.capacity = make(chan struct{}, *capacity)
	}
	listener, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("listening on %s\n", listener.Addr())
	server := &http.Server{Handler: p, ReadHeaderTimeout: 5 * time.Second}
	log.Fatal(server.Serve(listener))
}

// ServeHTTP routes a request, and writes its answer or its error envelope.
func (p *plugin) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if p.capacity != nil {
		p.capacity <- struct{}{} // blocked senders are woken in the order they came
		defer func() { <-p.capacity }()
	}
	if p.sleep > 0 {
		time.Sleep(p.sleep)
	}
	status, body, err := p.route(r)
	w.Header().Set("Content-Type", "application/json")
	if err != nil {
		var api *apiError
		if !errors.As(err, &api) {
			api = &apiError{http.StatusInternalServerError, "internal", err.Error()}
		}
		status, body = api.status, map[string]string{"code": api.code, "message": api.msg}
	}
	w.WriteHeader(status)
	if status != http.StatusNoContent {
		json.NewEncoder(w).Encode(body)
	}
}

func (p *plugin) route(r *http.Request) (int, interface{}, error) {
	parts := strings.Split(r.URL.EscapedPath(), "/")
	switch {
	case r.Method == "GET" && r.URL.Path == "/v1/health":
		return p.health(r.Context())
	case r.Method == "POST" && r.URL.Path == "/v1/search":
		return p.search(r)
	case len(parts) == 5 && parts[1] == "v1" && parts[2] == "namespaces" && parts[4] == "memories" &&
		r.Method == "POST":
		return p.write(r, parts[3])
	case len(parts) == 4 && parts[1] == "v1" && parts[2] == "namespaces" && r.Method == "PUT":
		return p.putNamespace(r, parts[3])
	case len(parts) == 4 && parts[1] == "v1" && parts[2] == "namespaces" && r.Method == "PATCH":
		return p.patchNamespace(r, parts[3])
	case len(parts) == 4 && parts[1] == "v1" && parts[2] == "namespaces" && r.Method == "DELETE":
		return p.deleteNamespace(r, parts[3])
	case len(parts) == 4 && parts[1] == "v1" && parts[2] == "memories" && r.Method == "DELETE":
		return p.deleteMemory(r, parts[3])
	}
	return 0, nil, notFound("no such route")
}

func (p *plugin) health(ctx context.Context) (int, interface{}, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	status, code := "ok", http.StatusOK
	if err := p.db.PingContext(ctx); err != nil {
		status, code = "degraded", http.StatusServiceUnavailable
	}
	return code, map[string]interface{}{"status": status, "version": "go-stand-in",
		"capabilities": []string{"fts"}}, nil
}

// namespaceOf checks a name from the path before the body is read: a refused write leaves its body
// unread, as the real plugin's does.
func namespaceOf(escaped string) (string, error) {
	name, err := decodePath(escaped)
	if err != nil || len(name) > 256 || !namespaceName.MatchString(name) {
		return "", badRequest("invalid namespace name")
	}
	return name, nil
}

func decodePath(escaped string) (string, error) { return url.PathUnescape(escaped) }

func decodeBody(r *http.Request, into interface{}) error {
	if err := json.NewDecoder(r.Body).Decode(into); err != nil {
		return badRequest("body is not valid JSON")
	}
	return nil
}

func (p *plugin) putNamespace(r *http.Request, escaped string) (int, interface{}, error) {
	name, err := namespaceOf(escaped)
	if err != nil {
		return 0, nil, err
	}
	var body struct {
		Kind      string          `json:"kind"`
		ExpiresAt *string         `json:"expires_at"`
		Metadata  json.RawMessage `json:"metadata"`
	}
	if err := decodeBody(r, &body); err != nil {
		return 0, nil, err
	}
	if !namespaceKinds[body.Kind] {
		return 0, nil, badRequest("kind must be one of workspace, team, org, custom")
	}
	var metadata interface{}
	if len(body.Metadata) > 0 && string(body.Metadata) != "null" {
		metadata = string(body.Metadata)
	}
	_, err = p.db.ExecContext(r.Context(),
		`INSERT INTO namespaces (name, kind, expires_at, metadata) VALUES ($1, $2, $3, $4)
		 ON CONFLICT (name) DO UPDATE SET kind = excluded.kind, expires_at = excluded.expires_at,
		 metadata = excluded.metadata, updated_at = now()`, name, body.Kind, body.ExpiresAt, metadata)
	if err != nil {
		return 0, nil, err
	}
	return http.StatusOK, map[string]interface{}{"name": name, "kind": body.Kind,
		"expires_at": body.ExpiresAt, "metadata": body.Metadata}, nil
}

type memoryWrite struct {
	ID          *string         `json:"id"`
	Content     *string         `json:"content"`
	Kind        string          `json:"kind"`
	Source      string          `json:"source"`
	ExpiresAt   *string         `json:"expires_at"`
	Propagation json.RawMessage `json:"propagation"`
	Pin         bool            `json:"pin"`
	Embedding   []float64       `json:"embedding"`
}

func (p *plugin) write(r *http.Request, escaped string) (int, interface{}, error) {
	namespace, err := namespaceOf(escaped)
	if err != nil {
		return 0, nil, err
	}
	var body memoryWrite
	if err := decodeBody(r, &body); err != nil {
		return 0, nil, err
	}
	if body.Content == nil || strings.TrimSpace(*body.Content) == "" {
		return 0, nil, badRequest("content is required and must not be empty")
	}
	if !memoryKinds[body.Kind] {
		return 0, nil, badRequest("kind must be one of fact, summary, checkpoint")
	}
	if !sources[body.Source] {
		return 0, nil, badRequest("source must be one of agent, runtime, user")
	}
	id := newID()
	if body.ID != nil {
		if id, err = canonicalUUID(*body.ID); err != nil {
			return 0, nil, badRequest("id must be a UUID")
		}
	}
	var propagation, embedding interface{}
	if len(body.Propagation) > 0 && string(body.Propagation) != "null" {
		if body.Propagation[0] != '{' {
			return 0, nil, badRequest("propagation must be an object")
		}
		propagation = string(body.Propagation)
	}
	if body.Embedding != nil {
		encoded, _ := json.Marshal(body.Embedding)
		embedding = string(encoded)
	}
	err = p.inTransaction(r.Context(), func(db execer) error {
		_, err := db.ExecContext(r.Context(),
			`INSERT INTO memories (id, namespace, content, kind, source, expires_at, propagation, pin, embedding)
			 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
			 ON CONFLICT (id) DO UPDATE SET namespace = excluded.namespace, content = excluded.content,
			 kind = excluded.kind, source = excluded.source, expires_at = excluded.expires_at,
			 propagation = excluded.propagation, pin = excluded.pin, embedding = excluded.embedding`,
			id, namespace, *body.Content, body.Kind, body.Source, body.ExpiresAt, propagation, body.Pin,
			embedding)
		return err
	})
	if err != nil {
		return 0, nil, fmt.Errorf("store write failed: %w", err)
	}
	return http.StatusCreated, map[string]string{"id": id, "namespace": namespace}, nil
}

type execer interface {
	ExecContext(ctx context.Context, query string, args ...interface{}) (sql.Result, error)
}

// inTransaction runs one write; with -wait the transaction holds its connection that long before it
// commits, as where the database commits to a slow disk.  Without it, one statement is one transaction.
func (p *plugin) inTransaction(ctx context.Context, work func(execer) error) error {
	if p.wait == 0 {
		return work(p.db)
	}
	tx, err := p.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if err := work(tx); err != nil {
		return err
	}
	time.Sleep(p.wait)
	return tx.Commit()
}

func (p *plugin) search(r *http.Request) (int, interface{}, error) {
	var body struct {
		Namespaces []string `json:"namespaces"`
		Query      string   `json:"query"`
		Kinds      []string `json:"kinds"`
		Limit      *int     `json:"limit"`
	}
	if err := decodeBody(r, &body); err != nil {
		return 0, nil, err
	}
	if len(body.Namespaces) == 0 {
		return 0, nil, badRequest("namespaces must be a non-empty array of names")
	}
	limit := 20
	if body.Limit != nil && *body.Limit != 0 {
		limit = *body.Limit
	}
	if limit < 1 || limit > searchCap {
		return 0, nil, badRequest("limit must be between 0 and 100")
	}
	where := []string{"namespace = ANY($1)", "(expires_at IS NULL OR expires_at > now())"}
	args := []interface{}{pq.Array(body.Namespaces), limit}
	if len(body.Kinds) > 0 {
		args = append(args, pq.Array(body.Kinds))
		where = append(where, fmt.Sprintf("kind = ANY($%d)", len(args)))
	}
	score, order := "NULL::real", "pin DESC, created_at DESC"
	switch {
	case len([]rune(body.Query)) >= 2:
		args = append(args, body.Query)
		tsquery := fmt.Sprintf("plainto_tsquery('english', $%d)", len(args))
		where = append(where, "content_tsv @@ "+tsquery)
		score, order = "ts_rank(content_tsv, "+tsquery+")", "score DESC, created_at DESC"
	case body.Query != "":
		args = append(args, body.Query)
		where = append(where, fmt.Sprintf("strpos(lower(content), lower($%d)) > 0", len(args)))
		order = "created_at DESC"
	}
	rows, err := p.db.QueryContext(r.Context(), fmt.Sprintf(
		`SELECT id, namespace, content, kind, source, created_at, expires_at, propagation, pin, %s AS score
		 FROM memories WHERE %s ORDER BY %s LIMIT $2`, score, strings.Join(where, " AND "), order), args...)
	if err != nil {
		return 0, nil, err
	}
	defer rows.Close()
	var memories []map[string]interface{} // nil when nothing matched: {"memories": null}, as the real one
	for rows.Next() {
		var id, namespace, content, kind, source string
		var created time.Time
		var expires sql.NullTime
		var propagation []byte
		var pin bool
		var score sql.NullFloat64
		if err := rows.Scan(&id, &namespace, &content, &kind, &source, &created, &expires, &propagation,
			&pin, &score); err != nil {
			return 0, nil, err
		}
		memory := map[string]interface{}{"id": id, "namespace": namespace, "content": content, "kind": kind,
			"source": source, "created_at": created, "pin": pin}
		if expires.Valid {
			memory["expires_at"] = expires.Time
		}
		if propagation != nil {
			memory["propagation"] = json.RawMessage(propagation)
		}
		if score.Valid {
			memory["score"] = score.Float64
		}
		memories = append(memories, memory)
	}
	if err := rows.Err(); err != nil {
		return 0, nil, err
	}
	return http.StatusOK, map[string]interface{}{"memories": memories}, nil
}

func (p *plugin) deleteMemory(r *http.Request, escaped string) (int, interface{}, error) {
	var body struct {
		RequestedBy *string `json:"requested_by_namespace"`
	}
	if err := decodeBody(r, &body); err != nil {
		return 0, nil, err
	}
	if body.RequestedBy == nil {
		return 0, nil, badRequest("requested_by_namespace is required")
	}
	if len(*body.RequestedBy) > 256 || !namespaceName.MatchString(*body.RequestedBy) {
		return 0, nil, badRequest("invalid namespace name")
	}
	raw, _ := decodePath(escaped)
	id, err := canonicalUUID(raw)
	if err != nil {
		return 0, nil, badRequest("id must be a UUID")
	}
	var deleted int64
	err = p.inTransaction(r.Context(), func(db execer) error {
		result, err := db.ExecContext(r.Context(), `DELETE FROM memories WHERE id = $1 AND namespace = $2`,
			id, *body.RequestedBy)
		if err == nil {
			deleted, err = result.RowsAffected()
		}
		return err
	})
	if err != nil {
		return 0, nil, err
	}
	if deleted == 0 {
		return 0, nil, notFound("memory not found")
	}
	return http.StatusNoContent, nil, nil
}

func (p *plugin) patchNamespace(r *http.Request, escaped string) (int, interface{}, error) {
	name, err := namespaceOf(escaped)
	if err != nil {
		return 0, nil, err
	}
	var body map[string]json.RawMessage
	if err := decodeBody(r, &body); err != nil {
		return 0, nil, err
	}
	expires, hasExpiry := body["expires_at"]
	metadata, hasMetadata := body["metadata"]
	if !hasExpiry && !hasMetadata {
		return 0, nil, badRequest("give expires_at or metadata")
	}
	var expiry, meta interface{}
	if hasExpiry && string(expires) != "null" {
		var text string
		if json.Unmarshal(expires, &text) != nil {
			return 0, nil, badRequest("expires_at must be a time")
		}
		expiry = text
	}
	if hasMetadata && string(metadata) != "null" {
		meta = string(metadata)
	}
	var kind string
	err = p.db.QueryRowContext(r.Context(),
		`UPDATE namespaces SET expires_at = CASE WHEN $2 THEN $3::timestamptz ELSE expires_at END,
		 metadata = CASE WHEN $4 THEN $5::jsonb ELSE metadata END, updated_at = now()
		 WHERE name = $1 RETURNING kind`, name, hasExpiry, expiry, hasMetadata, meta).Scan(&kind)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, nil, notFound("namespace not found")
	}
	if err != nil {
		return 0, nil, err
	}
	return http.StatusOK, map[string]interface{}{"name": name, "kind": kind}, nil
}

func (p *plugin) deleteNamespace(r *http.Request, escaped string) (int, interface{}, error) {
	name, err := namespaceOf(escaped)
	if err != nil {
		return 0, nil, err
	}
	result, err := p.db.ExecContext(r.Context(), `DELETE FROM namespaces WHERE name = $1`, name)
	if err != nil {
		return 0, nil, err
	}
	if n, _ := result.RowsAffected(); n == 0 {
		return 0, nil, notFound("namespace not found")
	}
	return http.StatusNoContent, nil, nil
}

var uuidText = regexp.MustCompile(`^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$`)

func canonicalUUID(text string) (string, error) {
	text = strings.TrimSuffix(strings.TrimPrefix(strings.TrimPrefix(text, "urn:uuid:"), "{"), "}")
	if !uuidText.MatchString(text) {
		return "", errors.New("not a UUID")
	}
	hex := strings.ToLower(strings.ReplaceAll(text, "-", ""))
	return hex[0:8] + "-" + hex[8:12] + "-" + hex[12:16] + "-" + hex[16:20] + "-" + hex[20:32], nil
}

func newID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err)
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}
