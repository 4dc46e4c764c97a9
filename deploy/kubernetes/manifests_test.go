// Package kubernetes holds the example manifests; its test decodes each of
// them strictly with the k8s.io/api types and checks their wiring.
package kubernetes

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/yaml"

	"github.com/sidecarlb/sidecar/config"
)

// manifests is every object in this folder's YAML files, by kind.
type manifests struct {
	deployments []*appsv1.Deployment
	configMaps  map[string]*corev1.ConfigMap
	secrets     map[string]*corev1.Secret
}

// load decodes every document of every .yaml file here, strictly: an
// unknown or misspelt field, a duplicate key or a wrong type is an error.
func load(t *testing.T) *manifests {
	t.Helper()
	files, err := filepath.Glob("*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests here (%v)", err)
	}
	m := &manifests{configMaps: map[string]*corev1.ConfigMap{}, secrets: map[string]*corev1.Secret{}}
	for _, file := range files {
		data, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		for i, doc := range splitDocuments(data) {
			where := fmt.Sprintf("%s document %d", file, i+1)
			var tm metav1.TypeMeta
			if err := yaml.Unmarshal(doc, &tm); err != nil {
				t.Fatalf("%s: %v", where, err)
			}
			var obj any
			switch tm.APIVersion + " " + tm.Kind {
			case "apps/v1 Deployment":
				d := &appsv1.Deployment{}
				m.deployments, obj = append(m.deployments, d), d
			case "v1 ConfigMap":
				cm := &corev1.ConfigMap{}
				obj = cm
				defer func() { m.configMaps[cm.Name] = cm }()
			case "v1 Secret":
				s := &corev1.Secret{}
				obj = s
				defer func() { m.secrets[s.Name] = s }()
			default:
				t.Fatalf("%s: unexpected %q %q; add its type to this test", where, tm.APIVersion, tm.Kind)
			}
			if err := yaml.UnmarshalStrict(doc, obj); err != nil {
				t.Fatalf("%s: %v", where, err)
			}
		}
	}
	return m
}

// splitDocuments splits a multi-document YAML stream on "---" lines,
// dropping documents with nothing but comments.
func splitDocuments(data []byte) [][]byte {
	var docs [][]byte
	for _, doc := range bytes.Split(append([]byte("\n"), data...), []byte("\n---")) {
		for _, line := range strings.Split(string(doc), "\n") {
			if l := strings.TrimSpace(line); l != "" && !strings.HasPrefix(l, "#") {
				docs = append(docs, doc)
				break
			}
		}
	}
	return docs
}

// TestStrictDecodeCatchesTypos: the decoding the manifests pass refuses a
// misspelt field, so the test below would catch one.
func TestStrictDecodeCatchesTypos(t *testing.T) {
	for _, doc := range []string{
		"apiVersion: apps/v1\nkind: Deployment\nspec:\n  replica: 3\n",
		"apiVersion: apps/v1\nkind: Deployment\nspec:\n  template:\n    spec:\n      initContainers:\n        - name: s\n          restartPolicy: Always\n          readinesProbe: {}\n",
		"apiVersion: v1\nkind: ConfigMap\ndata:\n  a: b\n  a: c\n",
	} {
		if err := yaml.UnmarshalStrict([]byte(doc), &appsv1.Deployment{}); err == nil {
			t.Errorf("UnmarshalStrict(%q) = nil, want an error", doc)
		}
	}
	if got := len(splitDocuments([]byte("# c\n---\na: 1\n---\n# only a comment\n---\nb: 2\n"))); got != 2 {
		t.Errorf("splitDocuments found %d documents, want 2", got)
	}
}

// TestManifests decodes every manifest strictly and checks the wiring of
// the example: a native sidecar (init container, restartPolicy Always)
// whose probes reach the admin listener of the config in the ConfigMap,
// POD_IP and HOST_IP from the downward API into service.address and
// consul.address, the token file from the Secret, and a preStop hook on the
// app that calls /drain with the admin token.
func TestManifests(t *testing.T) {
	m := load(t)
	if len(m.deployments) != 1 {
		t.Fatalf("found %d Deployments, want 1", len(m.deployments))
	}
	pod := m.deployments[0].Spec.Template.Spec

	var sc *corev1.Container
	for i := range pod.InitContainers {
		if c := &pod.InitContainers[i]; c.RestartPolicy != nil && *c.RestartPolicy == corev1.ContainerRestartPolicyAlways {
			sc = c
		}
	}
	if sc == nil {
		t.Fatal("no init container with restartPolicy Always (the native sidecar)")
	}

	// The config: the ConfigMap mounted where -config points.
	cfgPath := sc.Args[slices.Index(sc.Args, "-config")+1]
	cm := m.configMaps[configMapAt(t, pod, sc, filepath.Dir(cfgPath))]
	if cm == nil {
		t.Fatalf("%s is not in a ConfigMap of these manifests", cfgPath)
	}
	text, ok := cm.Data[filepath.Base(cfgPath)]
	if !ok {
		t.Fatalf("ConfigMap %s has no key %s", cm.Name, filepath.Base(cfgPath))
	}

	// Its environment: the downward API and the Secret.
	env := map[string]string{}
	want := map[string]string{"POD_IP": "status.podIP", "HOST_IP": "status.hostIP"}
	sample := map[string]string{"POD_IP": "10.244.1.7", "HOST_IP": "10.0.0.5"}
	for _, e := range sc.Env {
		switch {
		case e.ValueFrom != nil && e.ValueFrom.FieldRef != nil:
			if w := want[e.Name]; w != "" && e.ValueFrom.FieldRef.FieldPath != w {
				t.Errorf("env %s from %s, want %s", e.Name, e.ValueFrom.FieldRef.FieldPath, w)
			}
			env[e.Name] = sample[e.Name]
		case e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil:
			ref := e.ValueFrom.SecretKeyRef
			env[e.Name] = secretValue(t, m, ref.Name, ref.Key)
		default:
			env[e.Name] = e.Value
		}
	}
	for name := range want {
		if env[name] == "" {
			t.Errorf("env %s not set from the downward API", name)
		}
	}

	// The token file lies in the mounted Secret; validate with a copy of it.
	dir := t.TempDir()
	text = mountSecrets(t, m, pod, sc, text, dir)
	cfg, err := config.ParseEnv([]byte(text), cm.Name+"/"+filepath.Base(cfgPath), func(k string) string { return env[k] })
	if err != nil {
		t.Fatalf("the ConfigMap's config does not validate:\n%v", err)
	}
	if cfg.Service == nil || cfg.Service.Address != sample["POD_IP"] {
		t.Errorf("service.address = %v, want the pod IP %s", cfg.Service, sample["POD_IP"])
	}
	if host, _, _ := net.SplitHostPort(strings.TrimPrefix(cfg.Consul.Address, "https://")); host != sample["HOST_IP"] {
		t.Errorf("consul.address = %q, want the host IP %s", cfg.Consul.Address, sample["HOST_IP"])
	}
	_, adminPort, _ := net.SplitHostPort(cfg.Admin.Listen)

	// Probes on the admin listener.
	for _, p := range []struct {
		name  string
		probe *corev1.Probe
		path  string
	}{
		{"readinessProbe", sc.ReadinessProbe, "/ready"},
		{"livenessProbe", sc.LivenessProbe, "/healthz"},
		{"startupProbe", sc.StartupProbe, "/healthz"}, // not /ready: that waits for the app
	} {
		if p.probe == nil || p.probe.HTTPGet == nil {
			t.Errorf("sidecar %s: want an httpGet probe", p.name)
			continue
		}
		g := p.probe.HTTPGet
		if g.Path != p.path || port(t, sc, g.Port) != adminPort {
			t.Errorf("sidecar %s = GET %s on port %s, want %s on admin.listen's port %s", p.name, g.Path, port(t, sc, g.Port), p.path, adminPort)
		}
	}

	// preStop on every app container: GET /drain with the admin token.
	for _, c := range pod.Containers {
		hook := c.Lifecycle
		if hook == nil || hook.PreStop == nil || hook.PreStop.HTTPGet == nil {
			t.Errorf("container %s: no httpGet preStop hook", c.Name)
			continue
		}
		g := hook.PreStop.HTTPGet
		if g.Path != "/drain" || port(t, &c, g.Port) != adminPort {
			t.Errorf("container %s preStop = GET %s on port %s, want /drain on %s", c.Name, g.Path, port(t, &c, g.Port), adminPort)
		}
		auth := ""
		for _, h := range g.HTTPHeaders {
			if h.Name == "Authorization" {
				auth = h.Value
			}
		}
		if cfg.Admin.Token != "" && auth != "Bearer "+cfg.Admin.Token {
			t.Errorf("container %s preStop Authorization = %q, want the admin token of the config (%q)", c.Name, auth, "Bearer "+cfg.Admin.Token)
		}
	}
	if g := pod.TerminationGracePeriodSeconds; g == nil || float64(*g) <= cfg.Service.Drain.Seconds() {
		t.Errorf("terminationGracePeriodSeconds = %v, want more than service.drain (%v)", g, cfg.Service.Drain)
	}
}

// configMapAt returns the ConfigMap mounted into c at dir.
func configMapAt(t *testing.T, pod corev1.PodSpec, c *corev1.Container, dir string) string {
	t.Helper()
	for _, vm := range c.VolumeMounts {
		if vm.MountPath != dir {
			continue
		}
		for _, v := range pod.Volumes {
			if v.Name == vm.Name && v.ConfigMap != nil {
				return v.ConfigMap.Name
			}
		}
	}
	t.Fatalf("container %s mounts no ConfigMap at %s", c.Name, dir)
	return ""
}

// mountSecrets writes every Secret volume mounted into c under dir, as the
// kubelet would under its mount path, and points text's paths there.
func mountSecrets(t *testing.T, m *manifests, pod corev1.PodSpec, c *corev1.Container, text, dir string) string {
	t.Helper()
	for _, vm := range c.VolumeMounts {
		for _, v := range pod.Volumes {
			if v.Name != vm.Name || v.Secret == nil {
				continue
			}
			target := filepath.Join(dir, vm.Name)
			if err := os.MkdirAll(target, 0o700); err != nil {
				t.Fatal(err)
			}
			for _, it := range v.Secret.Items {
				val := secretValue(t, m, v.Secret.SecretName, it.Key)
				if err := os.WriteFile(filepath.Join(target, it.Path), []byte(val), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			text = strings.ReplaceAll(text, vm.MountPath+"/", target+"/")
		}
	}
	return text
}

func secretValue(t *testing.T, m *manifests, name, key string) string {
	t.Helper()
	s := m.secrets[name]
	if s == nil {
		t.Fatalf("Secret %s is not in these manifests", name)
	}
	if v, ok := s.StringData[key]; ok {
		return v
	}
	if v, ok := s.Data[key]; ok {
		return string(v)
	}
	t.Fatalf("Secret %s has no key %s", name, key)
	return ""
}

// port resolves a probe's or hook's port, by number or by the name of one
// of c's ports.
func port(t *testing.T, c *corev1.Container, p intstr.IntOrString) string {
	t.Helper()
	if p.Type == intstr.Int {
		return strconv.Itoa(p.IntValue())
	}
	for _, cp := range c.Ports {
		if cp.Name == p.StrVal {
			return strconv.Itoa(int(cp.ContainerPort))
		}
	}
	t.Errorf("container %s has no port named %q", c.Name, p.StrVal)
	return p.StrVal
}
