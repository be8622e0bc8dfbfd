// Authorization: what a run token may do.

package graph

import (
	"context"
	"fmt"
	"strings"

	"github.com/99designs/gqlgen/graphql"
	"github.com/vektah/gqlparser/v2/ast"
	"github.com/vektah/gqlparser/v2/gqlerror"

	"rendezvous/auth"
	"rendezvous/engine"
)

// authorize is an AroundOperations middleware: a run token may only run
// waitForEvent and workflowRun for its own run (and __typename).
func authorize(ctx context.Context, next graphql.OperationHandler) graphql.ResponseHandler {
	p := principal(ctx)
	if p == nil || p.FullAccess() {
		return next(ctx)
	}
	oc := graphql.GetOperationContext(ctx)
	for _, f := range rootFields(oc.Doc, oc.Operation.SelectionSet) {
		if err := runTokenMay(p, f, oc.Variables); err != nil {
			return graphql.OneShot(&graphql.Response{Errors: gqlerror.List{{
				Message:    err.Error(),
				Path:       ast.Path{ast.PathName(f.Alias)},
				Extensions: errorExtensions(ctx, codeForbidden),
			}}})
		}
	}
	return next(ctx)
}

func runTokenMay(p *auth.Principal, f *ast.Field, vars map[string]any) error {
	switch f.Name {
	case "__typename":
		return nil
	case "waitForEvent", "workflowRun":
		id, _ := f.ArgumentMap(vars)["workflowRunId"].(string)
		if id != "" && !strings.HasPrefix(id, engine.RunIDPrefix) {
			id = engine.RunIDPrefix + id
		}
		if id == p.RunID {
			return nil
		}
		return fmt.Errorf("this run token allows %s on run %s only", f.Name, p.RunID)
	}
	return fmt.Errorf("a run token may not use %s", f.Name)
}

// rootFields lists the operation's top-level fields, through fragments.
func rootFields(doc *ast.QueryDocument, set ast.SelectionSet) []*ast.Field {
	var out []*ast.Field
	var walk func(ast.SelectionSet, int)
	walk = func(set ast.SelectionSet, depth int) {
		if depth > 10 {
			return
		}
		for _, sel := range set {
			switch s := sel.(type) {
			case *ast.Field:
				out = append(out, s)
			case *ast.InlineFragment:
				walk(s.SelectionSet, depth+1)
			case *ast.FragmentSpread:
				if fr := doc.Fragments.ForName(s.Name); fr != nil {
					walk(fr.SelectionSet, depth+1)
				}
			}
		}
	}
	walk(set, 0)
	return out
}
