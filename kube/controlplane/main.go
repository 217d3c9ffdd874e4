// Command controlplane is TEST AND DEVELOPMENT SUPPORT ONLY: one binary holding a real Kubernetes
// control plane built from the upstream Go modules (pinned in go.mod), so the Workload Manager's
// Kubernetes backend, the chart's RBAC and the e2e suite run against a real kube-apiserver here.
// It is never shipped.
//
// Multi-call: the first argument (or the name it is invoked as) picks the component.
//
//	controlplane etcd ...                     go.etcd.io/etcd/server/v3 (embedded etcd)
//	controlplane kube-apiserver ...           k8s.io/kubernetes/cmd/kube-apiserver
//	controlplane kube-controller-manager ...  k8s.io/kubernetes/cmd/kube-controller-manager
//	controlplane kube-scheduler ...           k8s.io/kubernetes/cmd/kube-scheduler
//	controlplane kubectl ...                  k8s.io/kubectl
//
// The agent-sandbox controller is built from its own main package by scripts/build-kube.sh.
package main

import (
	"fmt"
	"os"
	"path/filepath"

	"go.etcd.io/etcd/server/v3/etcdmain"
	"k8s.io/component-base/cli"
	kubectl "k8s.io/kubectl/pkg/cmd"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	cm "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
)

func main() {
	name := filepath.Base(os.Args[0])
	args := os.Args
	if name == "controlplane" && len(os.Args) > 1 {
		name = os.Args[1]
		args = os.Args[1:]
	}
	os.Args = args
	switch name {
	case "etcd":
		etcdmain.Main(args)
	case "kube-apiserver":
		os.Exit(cli.Run(apiserver.NewAPIServerCommand()))
	case "kube-controller-manager":
		os.Exit(cli.Run(cm.NewControllerManagerCommand()))
	case "kube-scheduler":
		os.Exit(cli.Run(scheduler.NewSchedulerCommand()))
	case "kubectl":
		if err := cli.RunNoErrOutput(kubectl.NewDefaultKubectlCommand()); err != nil {
			fmt.Fprintln(os.Stderr, "error:", err)
			os.Exit(1)
		}
	default:
		fmt.Fprintln(os.Stderr, "usage: controlplane etcd|kube-apiserver|kube-controller-manager|kube-scheduler|kubectl ...")
		os.Exit(2)
	}
}
