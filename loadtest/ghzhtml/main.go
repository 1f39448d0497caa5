// Command ghzhtml renders a ghz JSON report (ghz -O json) as ghz's own HTML
// report (what ghz -O html writes), so one run gives both: ghz writes a
// single format per run. Built by scripts/install_ghz.sh into .tools/bin.
//
//	ghzhtml reports/recommend-const-100.json reports/recommend-const-100.html
package main

import (
	"encoding/json"
	"fmt"
	"os"

	"github.com/bojand/ghz/printer"
	"github.com/bojand/ghz/runner"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: ghzhtml REPORT.json OUT.html")
		os.Exit(2)
	}
	if err := convert(os.Args[1], os.Args[2]); err != nil {
		fmt.Fprintln(os.Stderr, "ghzhtml:", err)
		os.Exit(1)
	}
}

func convert(in, out string) error {
	raw, err := os.ReadFile(in)
	if err != nil {
		return err
	}
	var report runner.Report
	if err := json.Unmarshal(raw, &report); err != nil {
		return fmt.Errorf("%s is not a ghz JSON report: %w", in, err)
	}
	file, err := os.Create(out)
	if err != nil {
		return err
	}
	p := printer.ReportPrinter{Report: &report, Out: file}
	if err := p.Print("html"); err != nil {
		file.Close()
		return err
	}
	return file.Close()
}
