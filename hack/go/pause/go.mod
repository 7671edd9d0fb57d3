// The pod sandbox's process (what registry.k8s.io/pause is), built here: no image is pulled.
module outbound-relay/hack/go/pause

go 1.24
