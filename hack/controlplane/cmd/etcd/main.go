// Command etcd is etcd's own server entry point, built from go.etcd.io/etcd/server/v3
// at the version that k8s.io/kubernetes pins in its go.mod, so etcd and kube-apiserver
// come from one dependency graph and one build.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
