// kube-network-policies (sigs.k8s.io/kube-network-policies) for the local stack's real node.
//
// Upstream's cmd/main.go reads only the in-cluster config (a pod's service-account token); the
// stack runs it as a process in the node's network namespace, so this main takes --kubeconfig
// and otherwise does what upstream's does for plain NetworkPolicies: the same controller, the
// same nftables table, nfqueue verdicts. It also stops on SIGTERM (upstream: SIGINT only), so a
// stopped stack's controller removes its table before it exits.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"

	"golang.org/x/sys/unix"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"
	"sigs.k8s.io/kube-network-policies/pkg/networkpolicy"
)

func main() {
	os.Exit(run())
}

func run() int {
	kubeconfig := flag.String("kubeconfig", "", "kubeconfig of the API server (required)")
	nodeName := flag.String("hostname-override", "", "the Node whose pods this enforces policies for (required)")
	queueID := flag.Int("nfqueue-id", 100, "number of the nfqueue used")
	failOpen := flag.Bool("fail-open", false, "accept packets while the controller is not running")
	klog.InitFlags(nil)
	flag.Parse()
	if *kubeconfig == "" || *nodeName == "" {
		fmt.Fprintln(os.Stderr, "--kubeconfig and --hostname-override are required")
		return 2
	}
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, unix.SIGTERM)
	defer cancel()

	config, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		klog.ErrorS(err, "reading the kubeconfig", "path", *kubeconfig)
		return 1
	}
	config.AcceptContentTypes = "application/vnd.kubernetes.protobuf,application/json"
	config.ContentType = "application/vnd.kubernetes.protobuf"
	clientset, err := kubernetes.NewForConfig(config)
	if err != nil {
		klog.ErrorS(err, "creating the client")
		return 1
	}
	factory := informers.NewSharedInformerFactory(clientset, 0)
	controller, err := networkpolicy.NewController(
		clientset,
		factory.Networking().V1().NetworkPolicies(),
		factory.Core().V1().Namespaces(),
		factory.Core().V1().Pods(),
		nil, nil, nil, nil,
		networkpolicy.Config{
			FailOpen: *failOpen,
			QueueID:  *queueID,
			NodeName: *nodeName,
			// NRI stays "enabled": containerd 1.6 has none, so its stub only logs that it cannot connect
			// and pod IPs come from the API server. v0.8.0 with NRIdisabled dereferences a nil plugin for
			// every packet from an address that is no pod's (the host's, the node's).
			// Kernels from 6.12 on have the conntrack fix; older ones need DNS on the prerouting hook.
			NetfilterBug1766Fix: true,
		},
	)
	if err != nil {
		klog.ErrorS(err, "creating the network policy controller")
		return 1
	}
	factory.Start(ctx.Done())
	// Run returns when ctx is done, after deleting its nftables table (or at once if nfqueue cannot open).
	if err := controller.Run(ctx); err != nil {
		klog.ErrorS(err, "network policy controller stopped")
		return 1
	}
	return 0
}
